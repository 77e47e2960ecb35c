#!/usr/bin/env bash
# Write inventories/ENV/group_vars/all/vault.yml: every secret the inventories use (vault_*),
# with fresh random values, encrypted with Ansible Vault under the password in PASSWORD_FILE.
#
#   playbooks/scripts/make-vault.sh production ~/.ccat-vault-password
#   playbooks/scripts/make-vault.sh staging ~/.ccat-vault-password --force   # replace an existing one
#
# Real S3 keys are then put in with `ansible-vault edit` (the random ones are placeholders).
# The password file stays outside git; .gitignore in playbooks/ refuses the usual names.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=${1:?usage: make-vault.sh ENV PASSWORD_FILE [--force]}
pwfile=${2:?usage: make-vault.sh ENV PASSWORD_FILE [--force]}
force=${3:-}
dest="$here/inventories/$env/group_vars/all/vault.yml"
[ -d "$(dirname "$dest")" ] || { echo "make-vault: no inventory $env ($(dirname "$dest"))" >&2; exit 2; }
[ -r "$pwfile" ] || { echo "make-vault: cannot read the password file $pwfile" >&2; exit 2; }
if [ -e "$dest" ] && [ "$force" != --force ]; then
    echo "make-vault: $dest exists (--force replaces it)" >&2
    exit 2
fi
vault=${ANSIBLE_VAULT:-ansible-vault}
command -v "$vault" >/dev/null || vault="$here/../.venv/bin/ansible-vault"
secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24).replace("-", "x").replace("_", "y"))'; }
plain=$(mktemp)
trap 'rm -f "$plain"' EXIT
cat >"$plain" <<YAML
---
# Secrets of the $env inventory (made by scripts/make-vault.sh; edit with ansible-vault edit).
vault_postgresql_app_password: "$(secret)"
vault_postgresql_migration_password: "$(secret)"
vault_redis_password: "$(secret)"
vault_s3_cologne_lta_access_key_id: "$(secret)"
vault_s3_cologne_lta_secret_access_key: "$(secret)"
vault_s3_us_lta_access_key_id: "$(secret)"
vault_s3_us_lta_secret_access_key: "$(secret)"
# Optional, the managers' operator notifications (docs/ansible.md): no random placeholder, put
# the real ones in with ansible-vault edit.
# vault_transfer_notify_webhook_url: "https://..."
# vault_transfer_notify_smtp_password: "..."
YAML
"$vault" encrypt --vault-password-file "$pwfile" --output "$dest" "$plain" >/dev/null
chmod 0644 "$dest"
echo "make-vault: wrote $dest (encrypted)"
