# The two commands of the README's quick start. Each creates the virtual environment when it is
# missing (nothing but Python needed), then runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv proto clean

# constraints.txt pins the torch the tests ran on (pyproject.toml only gives a range).
$(BIN)/specpipe: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	touch $@

venv: $(BIN)/specpipe

demo: venv
	$(BIN)/specpipe demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

proto: venv
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info
