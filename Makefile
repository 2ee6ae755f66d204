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
# ansible-core alone, as requirements.txt pins it: ansible-test sanity runs from it (it installs its own pinned
# linters: keep them out of the project's virtualenv), and so does the tarball build (no host packages needed).
SANITY_VENV ?= $(CURDIR)/.venv-sanity
# The oldest ansible-core the collection claims (meta/runtime.yml): sanity and the unit tests run on it too, from
# virtualenvs of their own pinned by requirements-$(OLDEST_CORE).txt.
OLDEST_CORE := 2.16
OLDEST_REQUIREMENTS := requirements-$(OLDEST_CORE).txt
VENV_OLDEST ?= $(CURDIR)/.venv-$(OLDEST_CORE)
SANITY_VENV_OLDEST ?= $(CURDIR)/.venv-sanity-$(OLDEST_CORE)
SANITY_ROOT_OLDEST := $(BUILD)/sanity-$(OLDEST_CORE)/ansible_collections/clonesafe/fleet
CHANGELOG_PREVIEW := $(BUILD)/changelog/ansible_collections/clonesafe/fleet
PYTEST_ARGS ?=
# make demo HOSTS=3: the fleet lab (hypervisor hosts in their own namespaces on this machine, docs/fleet.md).
HOSTS ?= 1
FLEET_LAB_DIR ?= /var/lib/clonesafe-fleet-lab
FLEET_INVENTORY := $(FLEET_LAB_DIR)/inventory.yml

export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export CLONESAFE_ANSIBLE_PLAYBOOK := $(VENV)/bin/ansible-playbook

.PHONY: demo test deps venv collection lab sanity sanity-$(OLDEST_CORE) changelog-preview lint unit \
	unit-$(OLDEST_CORE) pytest lab-tests lab-tests-slow build clean fleet-lab fleet-demo fleet-lab-down

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

test: venv collection sanity sanity-$(OLDEST_CORE) lint pytest unit-$(OLDEST_CORE)

deps:
	hack/install-host-deps.sh

venv: deps $(VENV)/.installed

# $(call python_venv,DIR,REQUIREMENTS): the virtualenv DIR with everything REQUIREMENTS pins.
define python_venv
$(1)/.installed: $(2)
	$$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q -r $(2)
	touch $$@
endef
$(eval $(call python_venv,$(VENV),requirements.txt))
$(eval $(call python_venv,$(VENV_OLDEST),$(OLDEST_REQUIREMENTS)))

# Ansible finds the collection by its namespace path; the checkout itself is the collection.
collection:
	mkdir -p $(dir $(COLLECTION_LINK))
	ln -sfn $(CURDIR) $(COLLECTION_LINK)

lab: venv collection
	ansible-playbook playbooks/lab.yml

# $(call core_venv,DIR,REQUIREMENTS): the virtualenv DIR with only the ansible-core REQUIREMENTS pins, from
# wheels: making it compiles nothing and needs no host packages.
define core_venv
$(1)/.installed: $(2)
	$$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q --only-binary :all: "$$$$(grep '^ansible-core==' $(2))"
	touch $$@
endef
$(eval $(call core_venv,$(SANITY_VENV),requirements.txt))
$(eval $(call core_venv,$(SANITY_VENV_OLDEST),$(OLDEST_REQUIREMENTS)))

# $(call copy_collection,ROOT): copy the collection's files (tracked, or new and not ignored) to ROOT, a path that
# ends in ansible_collections/clonesafe/fleet as ansible-test and antsibull-changelog want.
define copy_collection
rm -rf $(1) && mkdir -p $(1)
git ls-files -z --cached --others --exclude-standard --deduplicate \
  | while IFS= read -r -d '' file; do [[ ! -e "$$file" ]] || printf '%s\0' "$$file"; done \
  | xargs -0 cp --parents -t $(1)
endef

# $(call sanity,VENV,ROOT): ansible-test sanity from VENV on a copy of the collection in ROOT; its changelog test
# lints changelogs/. ansible-test bootstraps each of its virtualenvs with a get-pip script it downloads;
# hack/ansible-test-get-pip.py stands in.
define sanity
pip_version=$$($(1)/bin/python -c 'from ansible_test._internal.python_requirements import get_venv_packages as p; from types import SimpleNamespace as n; print(p(n(version="3.11"))["pip"])') && \
  install -D -m 0644 hack/ansible-test-get-pip.py "$$HOME/.ansible/test/cache/get_pip_$${pip_version//./_}.py"
$(call copy_collection,$(2))
cd $(2) && git init -q && git add -A && $(1)/bin/ansible-test sanity --color no --python 3.11 --local --requirements
endef

sanity: deps $(SANITY_VENV)/.installed
	$(call sanity,$(SANITY_VENV),$(SANITY_ROOT))

sanity-$(OLDEST_CORE): deps $(SANITY_VENV_OLDEST)/.installed
	$(call sanity,$(SANITY_VENV_OLDEST),$(SANITY_ROOT_OLDEST))

# CHANGELOG.md as `antsibull-changelog release` would write it for the version in galaxy.yml, from a copy:
# $(CHANGELOG_PREVIEW)/CHANGELOG.md.
changelog-preview: venv
	$(call copy_collection,$(CHANGELOG_PREVIEW))
	cd $(CHANGELOG_PREVIEW) && git init -q && git add -A && antsibull-changelog release
	@echo "$(CHANGELOG_PREVIEW)/CHANGELOG.md"

lint: venv collection
	ansible-lint --profile production --offline

pytest: venv collection
	$(VENV)/bin/pytest -m "not not_yet_green and not slow_lab" $(PYTEST_ARGS)

unit: venv collection
	$(VENV)/bin/pytest -m "not lab" $(PYTEST_ARGS)

unit-$(OLDEST_CORE): deps $(VENV_OLDEST)/.installed collection
	PATH=$(VENV_OLDEST)/bin:$$PATH CLONESAFE_ANSIBLE_PLAYBOOK=$(VENV_OLDEST)/bin/ansible-playbook \
	  $(VENV_OLDEST)/bin/pytest -m "not lab and not dev_tools" $(PYTEST_ARGS)

lab-tests: venv collection
	$(VENV)/bin/pytest -m "lab and not not_yet_green and not slow_lab" $(PYTEST_ARGS)

# Lab tests too slow for CI's 90 minutes on a 2-core TCG host (see pytest.ini's slow_lab marker).
lab-tests-slow: venv collection
	$(VENV)/bin/pytest -m "slow_lab" $(PYTEST_ARGS)

# The tarball: what galaxy.yml's build_ignore leaves of the checkout. Needs Python only, not root.
build: $(SANITY_VENV)/.installed
	mkdir -p $(BUILD)/dist
	$(SANITY_VENV)/bin/ansible-galaxy collection build --force --output-path $(BUILD)/dist

clean:
	rm -rf $(BUILD) .pytest_cache
