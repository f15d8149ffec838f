# The two-command start: `make setup` (a fresh .venv with the test extras, then the demo) and `make test`.
# `make wheel-check` builds the wheel and checks it in a fresh venv with the core dependencies only.

PYTHON ?= python3
VENV ?= .venv
WHEEL_VENV ?= .venv-wheel
# The torch-only tests the wheel check runs against the installed package (not the checkout).
CORE_TESTS ?= tests/passes tests/test_packaging.py
# Arguments for `make test`, e.g. make test PYTEST_ARGS="tests/passes -x"
PYTEST_ARGS ?=

# A torch-only model folded and verified by the installed wheel (run outside the checkout, so it cannot import it).
define WHEEL_SMOKE
import fxreparam, torch
from torch import nn
assert "$(abspath $(WHEEL_VENV))" in fxreparam.__file__, f"imported {fxreparam.__file__}, not the wheel"
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
rep = fxreparam.report(fxreparam.optimize(model, torch.randn(1, 3, 16, 16)))
assert rep.verification.ok and rep.after.batch_norm == 0, rep
print("wheel check: fxreparam", fxreparam.__version__, "from", fxreparam.__file__, "folds:", rep.verification)
endef
export WHEEL_SMOKE

.PHONY: setup test wheel-check

setup:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e ".[test]"
	$(VENV)/bin/fxreparam demo

test:
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

wheel-check:
	rm -rf build dist $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip wheel --no-deps -w dist .
	$(PYTHON) -m zipfile -l dist/fxreparam-*.whl
	$(WHEEL_VENV)/bin/pip install dist/fxreparam-*.whl
	cd $(WHEEL_VENV) && bin/python -c "$$WHEEL_SMOKE"
	cd $(WHEEL_VENV) && bin/fxreparam demo --quiet
	$(WHEEL_VENV)/bin/pip install pytest hypothesis
	cd $(WHEEL_VENV) && bin/python -m pytest -p no:cacheprovider --rootdir=$(CURDIR) $(addprefix $(CURDIR)/,$(CORE_TESTS))
