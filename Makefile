# The two commands of the README: `make demo` and `make test`. Both set up .venv/ when needed.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test sweep-demo bench-init bench-accuracy clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first: deepspeed's source build imports it, so it builds without isolation.
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[scale,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vipamin_scale.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .venv
