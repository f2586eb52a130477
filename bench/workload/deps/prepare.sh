#!/bin/sh
# The "dependencies" step: cached until deps/ changes.
set -e
mkdir -p /deps
i=0
acc=0
while [ "$i" -lt "${N:-200000}" ]; do
  acc=$(((acc * 31 + i) % 1000003))
  i=$((i + 1))
done
echo "$acc" >/deps/acc
