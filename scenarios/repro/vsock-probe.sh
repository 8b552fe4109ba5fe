#!/bin/sh
# A user's reproducer, copied into the guest by the scenario's `files:` key.
# It connects to the host and sends a line naming the guest's CID.
cid=$(vmlab-guest info | sed -n 's/.*"cid":\([0-9]*\).*/\1/p')
exec vmlab-guest connect 2 "$1" --send "probe from cid $cid"
