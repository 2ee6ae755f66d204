# Two commands for a fresh machine, run as root:
#   make demo   brings the local lab up and shows the golden VM
#   make test   runs every test: sanity, lint, unit and the lab tests on real libvirt + QEMU
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
BUILD := $(CURDIR)/build
COLLECTIONS := $(BUILD)/collections
COLLECTION_LINK := $(COLLECTIONS)/ansible_collections/clonesafe/fleet
SANITY_ROOT := $(BUILD)/sanity/ansible_collections/clonesafe/fleet
# ansible-test installs its own pinned linters: keep them out of the project's virtualenv.
SANITY_VENV ?= $(CURDIR)/.venv-sanity
PYTEST_ARGS ?=
# make demo HOSTS=3: the fleet lab (hypervisor hosts in their own namespaces on this machine, docs/fleet.md).
HOSTS ?= 1
FLEET_LAB_DIR ?= /var/lib/clonesafe-fleet-lab
FLEET_INVENTORY := $(FLEET_LAB_DIR)/inventory.yml

export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export CLONESAFE_ANSIBLE_PLAYBOOK := $(VENV)/bin/ansible-playbook

.PHONY: demo test deps venv collection lab sanity lint unit pytest lab-tests build clean fleet-lab fleet-demo fleet-lab-down

demo: venv collection
ifeq ($(HOSTS),1)
	ansible-playbook playbooks/demo.yml
else
	$(MAKE) fleet-demo HOSTS=$(HOSTS)
endif

fleet-lab: venv collection
	FLEET_LAB_DIR=$(FLEET_LAB_DIR) ansible-playbook playbooks/fleet_lab.yml -e fleet_lab_hosts=$(HOSTS) -e fleet_lab_dir=$(FLEET_LAB_DIR)

fleet-demo: fleet-lab
	ansible-playbook -i $(FLEET_INVENTORY) playbooks/fleet_demo.yml -e clonesafe_show_before=true

fleet-lab-down:
	FLEET_LAB_DIR=$(FLEET_LAB_DIR) hack/fleet-lab.sh down

test: venv collection sanity lint pytest

deps:
	hack/install-host-deps.sh

venv: deps $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Ansible finds the collection by its namespace path; the checkout itself is the collection.
collection:
	mkdir -p $(dir $(COLLECTION_LINK))
	ln -sfn $(CURDIR) $(COLLECTION_LINK)

lab: venv collection
	ansible-playbook playbooks/lab.yml

# ansible-test wants the collection's real path to end in ansible_collections/clonesafe/fleet.
$(SANITY_VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(SANITY_VENV)
	$(SANITY_VENV)/bin/pip install -q --upgrade pip
	$(SANITY_VENV)/bin/pip install -q "$$(grep '^ansible-core==' requirements.txt)"
	pip_version=$$($(SANITY_VENV)/bin/python -c 'from ansible_test._internal.python_requirements import get_venv_packages as p; from types import SimpleNamespace as n; print(p(n(version="3.11"))["pip"])') && \
	  install -D -m 0644 hack/ansible-test-get-pip.py "$$HOME/.ansible/test/cache/get_pip_$${pip_version//./_}.py"
	touch $@

sanity: deps $(SANITY_VENV)/.installed
	rm -rf $(SANITY_ROOT) && mkdir -p $(SANITY_ROOT)
	git ls-files -z --cached --others --exclude-standard --deduplicate \
	  | while IFS= read -r -d '' file; do [[ ! -e "$$file" ]] || printf '%s\0' "$$file"; done \
	  | xargs -0 cp --parents -t $(SANITY_ROOT)
	cd $(SANITY_ROOT) && git init -q && git add -A && $(SANITY_VENV)/bin/ansible-test sanity --color no --python 3.11 --local --requirements

lint: venv collection
	ansible-lint --profile production --offline

pytest: venv collection
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: venv collection
	$(VENV)/bin/pytest -m "not lab" $(PYTEST_ARGS)

lab-tests: venv collection
	$(VENV)/bin/pytest -m lab $(PYTEST_ARGS)

build: venv
	mkdir -p $(BUILD)/dist
	ansible-galaxy collection build --force --output-path $(BUILD)/dist

clean:
	rm -rf $(BUILD) .pytest_cache
