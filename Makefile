# The two commands a newcomer needs: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt bench clean requirements

# the runtime pins of requirements.txt (what a deploy installs) constrain the dev venv too
$(STAMP): pyproject.toml requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Switchboard needs Python 3.11 or newer (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	grep -v '^\.$$' requirements.txt > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

## Pin the runtime dependencies again (after changing pyproject.toml): rewrites requirements.txt.
requirements:
	rm -rf .venv-pins && $(PYTHON) -m venv .venv-pins
	.venv-pins/bin/python -m pip install --quiet .
	{ sed -n '/^#/p;/^#/!q' requirements.txt; .venv-pins/bin/python -m pip freeze --exclude switchboard; \
	  printf '%s\n' '# the app itself: the `switchboard` command and its packaged migrations' '.'; } \
	  > requirements.new && mv requirements.new requirements.txt && rm -rf .venv-pins

## Run the server (web + worker, embedded Redis unless REDIS_URL is set) in the foreground.
run: $(STAMP)
	SWITCHBOARD_ALLOW_LOCAL_REPOS=$${SWITCHBOARD_ALLOW_LOCAL_REPOS:-true} $(BIN)/switchboard dev

## Run the whole test suite (SQLite + embedded Redis unless DATABASE_URL / REDIS_URL are set).
test: $(STAMP)
	$(BIN)/pytest -n $${PYTEST_WORKERS:-auto} -q $(PYTEST_ARGS)

## Run every benchmark in turn (PostgreSQL + Redis on this machine; several minutes).
bench: $(STAMP)
	for b in api dispatch webhooks streams terminal questions soak; do $(BIN)/python bench/$$b.py || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) instance/*.db instance/redis.* .pytest_cache
