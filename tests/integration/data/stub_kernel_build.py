#!/usr/bin/env python3
"""A stub kernel "build" for bisect tests: no compiler, seconds instead of minutes.

Run by `vmlab kernel build --build-cmd` in a synthetic git tree. It turns the stock kernel
package ($STUB_KERNEL_ROOT: boot/vmlinuz-*, lib/modules/<ver>/) into a package-like root in
$VMLAB_KERNEL_OUT, linking the kernel and module files instead of copying them. The tree's
files decide what comes out, like a commit changes a real kernel:
  BROKEN          exists -> the build fails (bisect must skip the commit)
  loopback        "no"   -> vsock_loopback is left out of modules.dep (the "bug")
"""
import os
import sys
from pathlib import Path

if Path("BROKEN").exists():
    print("stub.c:1:1: error: this commit does not build", file=sys.stderr)
    sys.exit(2)
root = Path(os.environ["STUB_KERNEL_ROOT"])
out = Path(os.environ["VMLAB_KERNEL_OUT"])
vmlinuz = sorted(root.glob("boot/vmlinuz-*"))[-1]
version = vmlinuz.name[len("vmlinuz-"):]
mods = root / "lib/modules" / version
(out / "boot").mkdir(parents=True)
os.symlink(vmlinuz, out / "boot" / vmlinuz.name)
dest = out / "lib/modules" / version
dest.mkdir(parents=True)
os.symlink(mods / "kernel", dest / "kernel")
for name in ("modules.builtin", "modules.order"):
    if (mods / name).exists():
        (dest / name).write_bytes((mods / name).read_bytes())
loopback = Path("loopback").read_text().strip() != "no"
dep = [line for line in (mods / "modules.dep").read_text().splitlines()
       if loopback or "vsock_loopback" not in line.split(":", 1)[0]]
(dest / "modules.dep").write_text("\n".join(dep) + "\n")
print(f"  STUB    {version} loopback={'yes' if loopback else 'no'}")
