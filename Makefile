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
PYTEST_ARGS ?=

export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export CLONESAFE_ANSIBLE_PLAYBOOK := $(VENV)/bin/ansible-playbook

.PHONY: demo test deps venv collection lab sanity lint unit pytest lab-tests build clean

demo: venv collection
	ansible-playbook playbooks/lab.yml

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
sanity: venv
	rm -rf $(SANITY_ROOT) && mkdir -p $(SANITY_ROOT)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(SANITY_ROOT)
	cd $(SANITY_ROOT) && ansible-test sanity --color no --python 3.11 --local

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
