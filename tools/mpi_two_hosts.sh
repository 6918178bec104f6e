#!/usr/bin/env bash
# Two "hosts" on one Linux machine, for showing hybridiff's MPI transport across hosts: two
# network namespaces (hd-host-a, hd-host-b), each with its own hostname and a veth end
# (10.77.0.1/24 and 10.77.0.2/24; no other address or route is touched), Open MPI over TCP
# between them, with mpirun's remote launcher being `ip netns exec` instead of ssh.
#
# Runs `hybridiff denoise --strategy hybrid` on the tiny SDXL fixture as 2 processes, one per
# namespace, and checks that the output equals the same job with ranks as threads, bit for bit.
#
# Usage (root, Open MPI installed, an MPI build of hybridiff):
#   cargo build --release -p hybridiff-cli --features mpi
#   sudo bash tools/mpi_two_hosts.sh [target/release/hybridiff]
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${1:-target/release/hybridiff}")
A=hd-host-a B=hd-host-b
IP_A=10.77.0.1 IP_B=10.77.0.2
WORK=$(mktemp -d)

cleanup() {
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$A"
ip netns add "$B"
ip link add hd-veth-a netns "$A" type veth peer name hd-veth-b netns "$B"
ip -n "$A" addr add "$IP_A/24" dev hd-veth-a
ip -n "$B" addr add "$IP_B/24" dev hd-veth-b
for ns in "$A" "$B"; do
    ip -n "$ns" link set lo up
done
ip -n "$A" link set hd-veth-a up
ip -n "$B" link set hd-veth-b up
echo "namespaces $A ($IP_A) and $B ($IP_B), joined by a veth pair"

# mpirun's "ssh": `AGENT HOST orted ARGS...` runs orted in HOST's namespace, under HOST's name.
cat >"$WORK/agent.sh" <<EOF
#!/usr/bin/env bash
host=\$1; shift
case \$host in
    $IP_A) ns=$A ;;
    $IP_B) ns=$B ;;
    *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
# Like ssh, the rest is one command line for the remote shell.
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$ns; \$*"
EOF
chmod +x "$WORK/agent.sh"
printf '%s slots=1\n%s slots=1\n' "$IP_A" "$IP_B" >"$WORK/hosts"

MODEL=tests/fixtures/tiny-sdxl
JOB=(denoise --model "$MODEL" --inputs "$MODEL/inputs.safetensors" --steps 20
     --strategy hybrid --l-slope 3 --eps-slope 0.05 --k 4 --tau-cap 10 --threads-per-rank 1)

# Both ranks are "remote" to mpirun (it runs in A's namespace but is given IPs), so each is
# started by the agent in its own namespace; byte transfer is TCP only (no shared memory).
# The single-quoted scripts are expanded by the inner shells, on purpose.
# shellcheck disable=SC2016
ip netns exec "$A" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$A" \
    mpirun --allow-run-as-root -np 2 --hostfile "$WORK/hosts" --map-by node \
    --mca plm_rsh_agent "$WORK/agent.sh" \
    --mca btl self,tcp --mca btl_tcp_if_include 10.77.0.0/24 \
    --mca oob_tcp_if_include 10.77.0.0/24 \
    sh -c 'echo "rank $OMPI_COMM_WORLD_RANK runs on host $(hostname), address $(ip -brief -4 addr show | grep -o "10\.77\.0\.[0-9]*")" >&2; exec "$@"' \
    sh "$BIN" "${JOB[@]}" --out "$WORK/two-hosts.safetensors" --trace "$WORK/two-hosts.json"

echo "traffic through host B's veth end: $(ip -n "$B" -s -j link show hd-veth-b | python3 -c \
    'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["rx"]["bytes"], "bytes in,", s["tx"]["bytes"], "bytes out")')"

"$BIN" "${JOB[@]}" --world-size 2 --out "$WORK/threads.safetensors" --trace "$WORK/threads.json"

cmp "$WORK/two-hosts.safetensors" "$WORK/threads.safetensors"
echo "two hosts over TCP == two threads: output files identical ($(stat -c %s "$WORK/threads.safetensors") bytes)"
python3 - "$WORK/two-hosts.json" "$WORK/threads.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"bytes sent: two hosts {a['bytes_sent']}, threads {b['bytes_sent']}; "
      f"tau1/tau2: {a['tau1']}/{a['tau2']} and {b['tau1']}/{b['tau2']}; "
      f"seconds: two hosts {a['total_seconds']:.3f}, threads {b['total_seconds']:.3f}")
assert a['bytes_sent'] == b['bytes_sent'] and a['rel_mae_log'] == b['rel_mae_log']
EOF
