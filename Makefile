# The two commands a newcomer needs:  make lab   and   make test
# Everything else is what those two call.

PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
KERNEL      := llm-course
STAMP       := $(VENV)/.installed
NB          ?=
PROFILE     ?= cpu
JOBS        ?= 2

.PHONY: lab test test-browser test-latest setup kernel assets nbval nbval-solution nbval-student student execute execute-all clean-cache \
	grade-setup release grade

# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
LAB_ARGS ?=

lab: setup  ## open the course in JupyterLab
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

test: setup student grade-setup  ## unit tests (the grading test needs .venv-grade), then nbval of both editions under the ci profile
	COURSE_PROFILE=ci $(PY) -m pytest -q -rs tests -p no:cacheprovider -n $(JOBS) --dist loadfile
	$(MAKE) nbval

setup: $(STAMP) kernel assets

# Re-install only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV) || { echo "error: could not create $(VENV) with $(PYTHON_BOOT); install Python 3.11 or run 'make PYTHON_BOOT=/path/to/python3.11 ...'"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

kernel: $(STAMP)
	@$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "LLM course (Python 3.11)" >/dev/null
	@$(PY) jupyter/install_settings.py >/dev/null
	@echo "Jupyter kernel '$(KERNEL)' registered in $(VENV)"

assets: $(STAMP)
	$(PY) -m course_lib.tools.assets fetch --all

student: $(STAMP)  ## write the student edition to student/notebooks
	$(PY) -m course_lib.editions student

nbval: nbval-solution nbval-student

NBVAL_FLAGS := --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
	-p no:cacheprovider -q -rs -n $(JOBS) --dist loadfile
# -c /dev/null keeps tests/conftest.py away from nbval, so what it sets for the unit tests is set here for
# the notebook kernels, which inherit this environment: the ci profile, and no Hugging Face Hub.
NBVAL_ENV := COURSE_PROFILE=ci HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

nbval-solution:
	cd notebooks && $(NBVAL_ENV) ../$(PY) -m pytest $(NBVAL_FLAGS) --rootdir=. -c /dev/null \
		--nbval-sanitize-with ../tests/nbval_sanitize.cfg *.ipynb

nbval-student:
	cd student/notebooks && $(NBVAL_ENV) ../../$(PY) -m pytest $(NBVAL_FLAGS) --rootdir=. -c /dev/null \
		--nbval-sanitize-with ../../tests/nbval_sanitize.cfg *.ipynb

test-browser: setup  ## JupyterLab in headless Chromium (needs scripts/install_browser.sh)
	COURSE_PROFILE=ci $(PY) -m pytest -q -rs tests/browser -p no:cacheprovider

test-latest:  ## canary: unit tests against the newest releases of the pinned packages (torch stays pinned), in .venv-latest
	JOBS=$(JOBS) bash scripts/test_latest.sh $(PYTHON_BOOT)

execute: $(STAMP)  ## re-execute one notebook in place: make execute NB=notebooks/01_attention.ipynb [PROFILE=cpu]
	@test -n "$(NB)" || { echo "usage: make execute NB=notebooks/NN_name.ipynb [PROFILE=cpu]"; exit 2; }
	COURSE_PROFILE=$(PROFILE) $(PY) -m course_lib.tools.widgets execute $(NB)

execute-all:
	for nb in notebooks/[0-9][0-9]_*.ipynb; do $(MAKE) execute NB=$$nb || exit 1; done

clean-cache:
	rm -rf data/cache

# ---- Grading a class with nbgrader (README, "Grading a class"): instructors only --------------------------
# .venv-grade holds nbgrader (requirements-instructor.txt) and sees .venv's packages through a .pth file, so
# nothing is installed twice and a student's .venv (make lab) never holds nbgrader.
GRADE_VENV  := .venv-grade
GRADE_PY    := $(GRADE_VENV)/bin/python
GRADE_STAMP := $(GRADE_VENV)/.installed
LESSON      ?=
SUBMISSIONS ?=

grade-setup: $(GRADE_STAMP)  ## create .venv-grade with nbgrader beside the course's packages

$(GRADE_STAMP): requirements-instructor.txt $(STAMP)
	@test -x $(GRADE_PY) || $(PY) -m venv $(GRADE_VENV)
	@$(PY) -c "import sysconfig; print('import site; site.addsitedir(' + repr(sysconfig.get_path('purelib')) + ')')" \
		> "$$($(GRADE_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_course_venv.pth"
	$(GRADE_PY) -m pip install --quiet -r requirements-instructor.txt
	touch $(GRADE_STAMP)

release: setup $(GRADE_STAMP)  ## the nbgrader release of one lesson, in the exchange: make release LESSON=01_attention
	@test -n "$(LESSON)" || { echo "usage: make release LESSON=01_attention"; exit 2; }
	$(GRADE_PY) -m course_lib.grading release $(LESSON)

grade: setup $(GRADE_STAMP)  ## autograde, feedback, gradebook: make grade LESSON=01_attention SUBMISSIONS=folder
	@test -n "$(LESSON)" || { echo "usage: make grade LESSON=01_attention [SUBMISSIONS=folder of notebooks]"; exit 2; }
	$(GRADE_PY) -m course_lib.grading grade $(LESSON) $(SUBMISSIONS)
