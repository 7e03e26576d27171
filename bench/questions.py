"""Questions bench: how long a person waits to see an agent's question, and the agent to go on.

Starts gunicorn (its defaults) and `switchboard worker` on a fresh PostgreSQL database and a
Redis db. One agent (a `shell` task running Python: the `switchboard` client every run has in
its home, imported once, as an agent written in Python would) asks N questions one after the
other, each stamped with the time it asked; the bench follows the task's SSE stream as a
person's browser does, answers each question the moment it appears, and the agent prints the
time it got the answer. Prints (p50 / p99, target <= 20 / 50 ms each):
  - question asked -> visible on the subscriber's stream;
  - answer sent -> agent resumed.
Both clocks are this host's (`time.time()`).

    .venv/bin/python bench/questions.py [--questions 200]
"""

from __future__ import annotations

import http.client
import json
import os
import time

from harness import Server, backend_parser, cpu_check, fresh_postgres_database, pct

AGENT = """python3 - <<'EOF'
import importlib.machinery, importlib.util, os, time
path = os.path.expanduser("~/.switchboard/bin/switchboard")
loader = importlib.machinery.SourceFileLoader("sb_client", path)
spec = importlib.util.spec_from_loader("sb_client", loader)
client = importlib.util.module_from_spec(spec)
loader.exec_module(client)
for i in range({n}):
    q = client.ask(f"q{{i}} {{time.time():.6f}}", choices=["yes", "no"])
    print(f"resumed {{i}} {{time.time():.6f}}", flush=True)
EOF"""


def sse_events(port: int, path: str, token: str):  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            return
        now = time.time()
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            event, data = None, None
            for line in block.split(b"\n"):
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: "):
                    data = json.loads(line[6:])
            if event:
                yield now, event, data


def main() -> None:
    parser = backend_parser(redis_db=12)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    db_url = fresh_postgres_database(args.database_url, "sb_bench_questions")
    # an agent asking hundreds of questions a minute is past the default write limit (300/min)
    server = Server(
        database_url=db_url,
        redis_url=args.redis_url,
        worker=True,
        SWITCHBOARD_RATE_LIMIT_WRITE="100000/minute",
        SWITCHBOARD_RATE_LIMIT_READ="100000/minute",
    )
    # the agent reaches this server: its port is chosen when the server is made
    server.env["SWITCHBOARD_PUBLIC_URL"] = f"http://127.0.0.1:{server.port}"
    with server:
        c = server.client()
        c.call("POST", "/api/v1/projects", {"key": "q", "name": "q", "default_agent": "shell"})
        print(
            f"Switchboard questions bench: PostgreSQL + Redis, gunicorn defaults, "
            f"{os.cpu_count()} CPUs; CPU check {cpu_check():.0f} ms"
        )
        status, task = c.call(
            "POST",
            "/api/v1/tasks",
            {"project": "q", "title": "asks", "prompt": AGENT.format(n=args.questions)},
        )
        assert status == 201, task
        seen, answered, resumed = {}, {}, {}
        asked = {}
        answerer = server.client()
        for now, event, data in sse_events(server.port, f"/api/v1/tasks/{task['id']}/stream",
                                           c.token):  # fmt: skip
            if event == "question" and data["status"] == "pending":
                i_text, stamp = data["prompt"][1:].split(" ")
                i = int(i_text)
                asked[i], seen[i] = float(stamp), now
                answered[i] = time.time()
                status, body = answerer.call(
                    "POST", f"/api/v1/questions/{data['id']}/answer", {"answer": "yes"}
                )
                assert status == 200, body
            elif event == "log":
                for line in data["text"].splitlines():
                    if line.startswith("resumed "):
                        _, i_text, stamp = line.split()
                        resumed[int(i_text)] = float(stamp)
            elif event == "done":
                break
        shown = [seen[i] - asked[i] for i in seen]
        going = [resumed[i] - answered[i] for i in resumed if i in answered]
        print(
            f"question asked -> on a subscriber's stream, {len(shown)} questions: "
            f"p50 {pct(shown, 0.5):.1f} ms, p99 {pct(shown, 0.99):.1f} ms (target <= 20 / 50)"
        )
        print(
            f"answer sent -> agent resumed, {len(going)} answers: "
            f"p50 {pct(going, 0.5):.1f} ms, p99 {pct(going, 0.99):.1f} ms (target <= 20 / 50)"
        )


if __name__ == "__main__":
    main()
