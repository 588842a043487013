#!/usr/bin/env bash
# Makes sure the services the test suite talks to are there: PostgreSQL on 127.0.0.1:5432
# with a `postgres` role reachable without a password from loopback. Installs and starts
# them when absent (CI runs as root on a Debian machine). Idempotent.
set -euo pipefail

pg_ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }

if ! pg_ready; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "ensure-services: installing PostgreSQL" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  if ! pg_lsclusters -h | grep -q .; then
    pg_createcluster "$ver" main >/dev/null
  fi
  hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if ! grep -q "prvng-test" "$hba"; then
    printf '# prvng-test: loopback trust for the test suite\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' \
      | cat - "$hba" > "$hba.new" && mv "$hba.new" "$hba"
    chown postgres:postgres "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
  for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
fi
pg_ready || { echo "ensure-services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

# Programs the provisioning-domain tests run on `local` servers (task services), the sshd the
# `ssh` provider tests start on a loopback port, and the browser of the UI tests. Installed
# from Debian's packages when missing.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
# Debian's Chromium, driven headless by the web UI's Playwright tests (tests/browser/).
[ -x /usr/bin/chromium ] || need+=(chromium)
# Validators of the deployment artifacts (tests/deploy/): systemd-analyze, promtool (Debian's
# prometheus package), named-checkzone.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v named-checkzone >/dev/null 2>&1 || need+=(bind9-utils)
if [ ${#need[@]} -gt 0 ]; then
  echo "ensure-services: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's packages start their daemons on install; the tests start their own.
for svc in nginx ssh; do
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
