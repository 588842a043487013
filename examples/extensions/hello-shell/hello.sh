#!/bin/sh
# The protocol: one JSON request on stdin, one JSON answer on stdout, progress on stderr,
# exit 0 on success. (docs/reference/extensions.md)
set -eu
req=$(cat)
field() { printf '%s' "$req" | sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p" | head -n1; }
op=$(field operation)
host=$(field hostname)
runtime=$(field runtime_dir)
file="$runtime/hello-shell/$host.txt"
case "$op" in
  install)
    echo "hello-shell: greeting $host" >&2
    mkdir -p "$(dirname "$file")"
    printf 'hello, %s\n' "$host" > "$file"
    printf '{"ok": true, "details": {"file": "%s"}}\n' "$file" ;;
  remove)
    rm -f "$file"
    printf '{"ok": true, "details": {}}\n' ;;
  check)
    if [ -f "$file" ]; then printf '{"ok": true, "details": {"greeting": "%s"}}\n' "$(cat "$file")"
    else echo "hello-shell: no greeting for $host at $file" >&2; exit 1; fi ;;
  *) echo "hello-shell: unknown operation $op" >&2; exit 2 ;;
esac
