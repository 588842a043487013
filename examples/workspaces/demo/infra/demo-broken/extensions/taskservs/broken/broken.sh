#!/bin/sh
# install fails; remove and check succeed (nothing was installed).
op=$(sed -n 's/.*"operation": *"\([a-z]*\)".*/\1/p')
case "$op" in
  install) echo "broken: the package repository is unreachable (on purpose)" >&2; exit 1 ;;
  *) echo '{"ok": true, "details": {}}' ;;
esac
