"""Static checks of the Ansible tree in playbooks/ (fast and offline; no container is started).

The real behaviour of the roles (converge, idempotence, services answering) is checked by
``molecule test`` in ``playbooks/molecule.sh`` (``make molecule``); these tests catch what can be
seen without a host: playbook syntax against both inventories with a throwaway vault, the
inventory groups, the vault being encrypted, argument specs matching the defaults and rejecting
bad input with the variable's name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOKS = ROOT / "playbooks"
ROLES = ["ccat_common", "postgresql", "redis", "ops_db_api", "transfer_agent"]
GROUPS = [
    "instrument_computers",
    "buffer_nodes",
    "input_nodes",
    "archive_gateway",
    "staging",
    "database",
    "api",
]
SITES = ["ccat", "cologne", "us"]
INVENTORIES = ["production", "staging"]
PLAYBOOK_FILES = ["site.yml", "ssh_trust.yml", *(f"{g}.yml" for g in GROUPS)]
INSTALL_HINT = (
    "install the Ansible tools: .venv/bin/pip install ansible==12.3.0 ansible-core==2.19.14 "
    "ansible-lint molecule 'molecule-plugins[docker]' yamllint"
)


def _tool(name: str) -> str:
    """Path of an Ansible command line tool (the project's venv first); fail with a hint."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return found


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run an Ansible command (its temporary files under pytest's base temp); assert success."""
    merged = {**os.environ, "ANSIBLE_NOCOLOR": "1"}
    merged.update(env or {})
    proc = subprocess.run(
        args, cwd=cwd, env=merged, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def vaulted_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of playbooks/ (no wheelhouse) whose vaults are remade with a throwaway password."""
    tree = tmp_path_factory.mktemp("ansible") / "playbooks"
    shutil.copytree(PLAYBOOKS, tree, ignore=shutil.ignore_patterns(".wheelhouse", "molecule"))
    password = tree.parent / "throwaway-vault-password"
    password.write_text(os.urandom(24).hex() + "\n")
    vault_bin = _tool("ansible-vault")
    for inv in INVENTORIES:
        _run(
            ["bash", "scripts/make-vault.sh", inv, str(password), "--force"],
            cwd=tree,
            env={"ANSIBLE_VAULT": vault_bin, "ANSIBLE_LOCAL_TEMP": str(tree.parent / "t")},
        )
    return tree, password


def test_committed_vaults_are_encrypted_and_password_files_ignored() -> None:
    for inv in INVENTORIES:
        vault = PLAYBOOKS / "inventories" / inv / "group_vars" / "all" / "vault.yml"
        assert vault.read_text().startswith("$ANSIBLE_VAULT;1.1;AES256"), f"{vault} not encrypted"
    ignored = (PLAYBOOKS / ".gitignore").read_text().split()
    assert ".vault-password" in ignored and "vault-password*" in ignored


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_inventory_has_every_group_and_site_and_decrypts(
    vaulted_tree: tuple[Path, Path], inventory: str
) -> None:
    tree, password = vaulted_tree
    out = _run(
        [
            _tool("ansible-inventory"),
            "-i",
            f"inventories/{inventory}/hosts.yml",
            "--vault-password-file",
            str(password),
            "--list",
        ],
        cwd=tree,
    )
    data = json.loads(out)
    for group in GROUPS + SITES:
        assert data.get(group, {}).get("hosts"), f"{inventory}: group {group} has no hosts"
    hostvars = data["_meta"]["hostvars"]
    db_host = data["database"]["hosts"][0]
    assert len(hostvars[db_host]["vault_postgresql_app_password"]) >= 20
    # every transfer host knows its site, and its workers name locations
    for group in ("buffer_nodes", "input_nodes", "archive_gateway", "staging"):
        for host in data[group]["hosts"]:
            assert hostvars[host]["transfer_agent_site"] in SITES
            assert all(w["locations"] for w in hostvars[host]["transfer_agent_workers"])


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_every_playbook_passes_syntax_check(
    vaulted_tree: tuple[Path, Path], inventory: str
) -> None:
    tree, password = vaulted_tree
    _run(
        [
            _tool("ansible-playbook"),
            "-i",
            f"inventories/{inventory}/hosts.yml",
            "--vault-password-file",
            str(password),
            "--syntax-check",
            *PLAYBOOK_FILES,
        ],
        cwd=tree,
    )


@pytest.mark.parametrize("role", ROLES)
def test_role_layout_and_argument_specs_match_defaults(role: str) -> None:
    base = PLAYBOOKS / "roles" / role
    for part in (
        "defaults/main.yml",
        "handlers/main.yml",
        "meta/main.yml",
        "meta/argument_specs.yml",
        "tasks/main.yml",
        "molecule/default/molecule.yml",
        "molecule/default/converge.yml",
        "molecule/default/verify.yml",
    ):
        assert (base / part).is_file(), f"{role}: {part} is missing"
    defaults = yaml.safe_load((base / "defaults/main.yml").read_text()) or {}
    spec = yaml.safe_load((base / "meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options), (
        f"{role}: defaults without a spec: {sorted(set(defaults) - set(options))}; "
        f"spec without a default: {sorted(set(options) - set(defaults))}"
    )
    for name, opt in options.items():
        assert name.startswith(f"{role}_"), f"{role}: {name} lacks the role prefix"
        assert opt.get("description"), f"{role}: {name} has no description"
    molecule = yaml.safe_load((base / "molecule/default/molecule.yml").read_text())
    assert molecule["driver"]["name"] == "docker"
    steps = molecule["scenario"]["test_sequence"]
    assert {"converge", "idempotence", "verify"} <= set(steps)


def test_argument_spec_rejects_bad_input_naming_the_variable(tmp_path: Path) -> None:
    """The role's own spec, applied by Ansible to bad values, names the variable at fault."""
    play = tmp_path / "validate.yml"
    spec_file = PLAYBOOKS / "roles" / "redis" / "meta" / "argument_specs.yml"
    options = yaml.safe_load(spec_file.read_text())["argument_specs"]["main"]["options"]
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Validate",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Validate",
                            "ansible.builtin.validate_argument_spec": {
                                "argument_spec": options,
                                "provided_arguments": {
                                    "redis_port": "not-a-port",
                                    "redis_maxmemory_policy": "allkeys-whatever",
                                },
                            },
                        }
                    ],
                }
            ]
        )
    )
    proc = subprocess.run(
        [_tool("ansible-playbook"), "-i", "localhost,", str(play)],
        cwd=tmp_path,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "t")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for name in ("redis_port", "redis_maxmemory_policy", "redis_password"):
        assert name in out, f"{name} not named in:\n{out}"


def test_requirements_pin_the_collections_the_ansible_package_bundles(tmp_path: Path) -> None:
    reqs = yaml.safe_load((PLAYBOOKS / "requirements.yml").read_text())["collections"]
    galaxy = _tool("ansible-galaxy")
    out = _run(
        [galaxy, "collection", "list", "--format", "json"],
        cwd=tmp_path,
        env={"ANSIBLE_LOCAL_TEMP": str(tmp_path / "t")},
    )
    installed: dict[str, str] = {}
    for collections in json.loads(out).values():
        for name, info in collections.items():
            installed.setdefault(name, info["version"])
    for req in reqs:
        assert installed.get(req["name"]) == req["version"], (
            f"{req['name']}: requirements.yml pins {req['version']}, "
            f"the installed ansible package has {installed.get(req['name'])}"
        )
