#!/bin/sh
# A real kernel "build" for the bisect test over kernel configs: the synthetic tree's commits
# carry only a Kconfig fragment (frag.config); each is built for real from the distribution's
# source with vmlab's recipe (`vmlab kernel build --config`, cached per fragment), and the
# result is handed to `vmlab bisect` in $VMLAB_KERNEL_OUT. Run in the tree by --build-cmd.
set -eu
out=$(${PYTHON:-python3} -m vmlab kernel build --config frag.config)
kernel=$(printf '%s\n' "$out" | sed -n 's/^kernel: //p')
[ -n "$kernel" ] || { echo "no kernel: line in: $out" >&2; exit 1; }
cp "$kernel" "$VMLAB_KERNEL_OUT/bzImage"
cp "$(dirname "$kernel")/config" "$VMLAB_KERNEL_OUT/config"
printf '%s\n' "$out"
