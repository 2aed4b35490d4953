# Set-up is two commands: `make serve` (virtualenv, install, serve tf_files/demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: venv serve test test-long demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt -r requirements-dev.txt
	touch $@

serve: venv
	$(BIN)/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: venv
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/python scripts/build_demo.py

clean:
	rm -rf $(VENV) .pytest_cache build
