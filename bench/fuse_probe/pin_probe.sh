#!/bin/bash
# CPU placement probe: 4 KiB random writes, 1 job, single-threaded mfusepy daemon,
# daemon and fio on the same CPU vs on different CPUs (2-core VM).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
B=${B:-/var/tmp/fuse_probe_pin}
for placement in "0 0" "0 1" "any any"; do
  set -- $placement
  rm -rf $B; mkdir -p $B/back $B/mnt
  if [ "$1" = any ]; then PD=""; PF=""; else PD="taskset -c $1"; PF="taskset -c $2"; fi
  $PD python3 $HERE/passthrough.py $B/back $B/mnt --nothreads ${PT_ARGS:-} > $B/log 2>&1 &
  PID=$!
  for i in $(seq 50); do mountpoint -q $B/mnt && break; sleep 0.1; done
  IOPS=$($PF fio --name=pin --directory=$B/mnt --rw=randwrite --bs=4k --size=256M --numjobs=1 \
      --ioengine=psync --direct=0 --end_fsync=1 --time_based --runtime=${RT:-10} --fallocate=none \
      --output-format=terse | awk -F';' '{print $49}')
  echo "daemon_cpu=$1 fio_cpu=$2 rand4k_iops=$IOPS"
  fusermount3 -u $B/mnt; wait $PID
done
rm -rf $B
