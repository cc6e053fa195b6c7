#!/bin/sh
# nic.sh -i IFACE [--dry-run] [--rss N] [--coalesce USECS]
#
# Spread a multiqueue NIC over the CPUs for Fastsocket: IRQ affinity round-robin over the
# online CPUs (queue k -> k-th CPU), XPS one-to-one when tx queues >= CPUs, RPS/RFS over
# all CPUs when rx queues != CPUs, interrupt coalescing (~3000 irq/s) with ethtool, and
# irqbalance stopped so it does not undo the affinity.  --rss N first sets N channels
# with `ethtool -L`.  --dry-run prints the plan and changes nothing.
#
# POSIX sh (runs under busybox ash).  Loops run on builtins only, no subshell or command per
# queue or IRQ: every fork costs tens of milliseconds under emulation (the smoke guest) and
# on a loaded host.  Tests point NIC_SH_ROOT at a fake tree holding
# sys/ and proc/; then ethtool is only used when NIC_SH_ETHTOOL names one, NIC_SH_UID
# replaces `id -u` for the root check, and no process is ever signalled.
#
# Exit: 0 done, 1 some setting failed, 2 usage, 3 not root, 4 no such interface,
#       5 interface down.
set -u

ROOT=${NIC_SH_ROOT:-}
SYS=$ROOT/sys
PROC=$ROOT/proc
# The effective uid from /proc/self/status (the shell's own: a builtin's redirection),
# `id -u` only without /proc.
euid() {
	EUID_NOW=
	while read -r k _ e _; do
		[ "$k" = Uid: ] && EUID_NOW=$e && break
	done 2>/dev/null </proc/self/status
	is_num "$EUID_NOW" || EUID_NOW=$(id -u)
}
is_num() { case $1 in '' | *[!0-9]*) return 1 ;; esac; return 0; }
if [ -n "$ROOT" ]; then
	ETHTOOL=${NIC_SH_ETHTOOL:-}
	[ -n "${NIC_SH_UID:-}" ] || euid
	UID_NOW=${NIC_SH_UID:-$EUID_NOW}
else
	ETHTOOL=ethtool
	euid
	UID_NOW=$EUID_NOW
fi
SUPPORTED="igb ixgbe e1000e virtio_net bnx2 tg3"
IFACE=
DRY=0
RSS=
COALESCE=333
FAILED=0

usage() {
	echo "usage: nic.sh -i IFACE [--dry-run] [--rss N] [--coalesce USECS]" >&2
	exit 2
}
die() { code=$1; shift; echo "nic.sh: $*" >&2; exit "$code"; }
warn() { echo "nic.sh: warning: $*" >&2; }

while [ $# -gt 0 ]; do
	case $1 in
	-i) [ $# -ge 2 ] || usage; IFACE=$2; shift ;;
	--dry-run | -n) DRY=1 ;;
	--rss) [ $# -ge 2 ] && is_num "$2" && [ "$2" -ge 1 ] || usage; RSS=$2; shift ;;
	--coalesce) [ $# -ge 2 ] && is_num "$2" || usage; COALESCE=$2; shift ;;
	-h | --help) usage ;;
	*) usage ;;
	esac
	shift
done
[ -n "$IFACE" ] || usage
case $IFACE in */* | . | .. | -*) die 2 "bad interface name '$IFACE'" ;; esac

have_ethtool() { [ -n "$ETHTOOL" ] && command -v "$ETHTOOL" >/dev/null 2>&1; }

# Writes and commands go through these two, so --dry-run cannot change anything.
put() { # FILE VALUE
	if [ "$DRY" = 1 ]; then
		echo "  would write $2 > ${1#"$ROOT"}"
	elif [ ! -e "$1" ]; then
		warn "${1#"$ROOT"} does not exist"
		FAILED=1
	# echo, not printf: one write(2) per value. Some shells' printf (glibc busybox on 2.6.32)
	# writes the value and the newline separately, and a lone "\n" is an invalid mask.
	elif echo "$2" 2>/dev/null >"$1"; then
		echo "  wrote $2 > ${1#"$ROOT"}"
	else
		warn "cannot write $2 > ${1#"$ROOT"}"
		FAILED=1
	fi
}
run() {
	if [ "$DRY" = 1 ]; then
		echo "  would run: $*"
	elif "$@" >/dev/null 2>&1; then
		echo "  ran: $*"
	else
		warn "failed: $*"
		return 1
	fi
}

# HEX <- VALUE in hex, at least WIDTH digits (zero-padded).
tohex() { # VALUE WIDTH
	v=$1
	HEX=
	while [ "$v" -gt 0 ] || [ ${#HEX} -lt "$2" ]; do
		case $((v % 16)) in
		10) d=a ;; 11) d=b ;; 12) d=c ;; 13) d=d ;; 14) d=e ;; 15) d=f ;; *) d=$((v % 16)) ;;
		esac
		HEX=$d$HEX
		v=$((v / 16))
	done
}

# MASK <- hex cpumask of the CPUs given as arguments, in 32-bit groups ("ff", "1,00000000").
cpumask() {
	maxg=0
	for c in "$@"; do [ $((c / 32)) -gt $maxg ] && maxg=$((c / 32)); done
	MASK=
	g=$maxg
	while [ $g -ge 0 ]; do
		w=0
		for c in "$@"; do [ $((c / 32)) -eq $g ] && w=$((w | (1 << (c % 32)))); done
		if [ $g -eq $maxg ]; then tohex $w 1; else tohex $w 8; fi
		MASK=${MASK:+$MASK,}$HEX
		g=$((g - 1))
	done
}

# CPUS <- "0-3,6" expanded to "0 1 2 3 6"
expand_cpus() {
	CPUS=
	old_ifs=$IFS
	IFS=,
	for r in $1; do
		a=${r%%-*}
		b=${r#*-}
		is_num "$a" || continue
		is_num "$b" || b=$a
		i=$a
		while [ "$i" -le "$b" ]; do CPUS="$CPUS $i"; i=$((i + 1)); done
	done
	IFS=$old_ifs
	CPUS=${CPUS# }
}

# NTH <- the N-th word (0-based) of WORDS.
nth() { # N WORDS...
	shift $(($1 + 1))
	NTH=$1
}

# ---- checks ----
NET=$SYS/class/net/$IFACE
[ "$DRY" = 1 ] || [ "$UID_NOW" = 0 ] || die 3 "must run as root (or use --dry-run)"
[ -d "$NET" ] || die 4 "no such interface: $IFACE"
read -r flags 2>/dev/null <"$NET/flags" || flags=0
read -r oper 2>/dev/null <"$NET/operstate" || oper=unknown
if [ $((flags & 1)) -eq 0 ] && [ "$oper" != up ]; then
	die 5 "interface $IFACE is down (ip link set $IFACE up)"
fi

DRIVER=
if have_ethtool; then
	DRIVER=$("$ETHTOOL" -i "$IFACE" 2>/dev/null | sed -n 's/^driver: *//p')
fi
if [ -z "$DRIVER" ] && [ -r "$NET/device/uevent" ]; then # DRIVER=igb, read by the builtin
	while IFS== read -r k v; do [ "$k" = DRIVER ] && DRIVER=$v; done <"$NET/device/uevent"
fi
if [ -z "$DRIVER" ] && [ -L "$NET/device/driver" ]; then
	DRIVER=$(readlink "$NET/device/driver")
	DRIVER=${DRIVER##*/}
fi
[ -n "$DRIVER" ] || DRIVER=unknown
case " $SUPPORTED " in
*" $DRIVER "*) ;;
*) warn "driver $DRIVER is not one of: $SUPPORTED; using the generic layout" ;;
esac

read -r online 2>/dev/null <"$SYS/devices/system/cpu/online" || online=0
expand_cpus "$online"
set -- $CPUS
CPUS="$*"
NCPU=$#
[ "$NCPU" -ge 1 ] || die 1 "no online CPUs found"

count_queues() { # rx|tx -> NQ
	NQ=0
	for q in "$NET"/queues/"$1"-*; do [ -d "$q" ] && NQ=$((NQ + 1)); done
}

# IRQS <- the NIC's IRQs from /proc/interrupts, one "IRQ NAME" per line.  virtio names its
# vectors after the virtio device (virtio0-input.0), found through the sysfs device link.
# Builtins only (no awk, no subshell): the name is a line's last field.
list_irqs() {
	IRQS=
	vdev=
	if [ "$DRIVER" = virtio_net ] && [ -L "$NET/device" ]; then
		vdev=$(readlink "$NET/device")
		vdev=${vdev##*/}
	fi
	single=
	while read -r irq rest; do
		case $irq in *:) irq=${irq%:} ;; *) continue ;; esac
		is_num "$irq" || continue
		n=${rest##*[ 	]}
		if [ -n "$vdev" ]; then
			case $n in
			"$vdev"-input.*) is_num "${n#"$vdev"-input.}" || continue ;;
			"$vdev"-output.*) is_num "${n#"$vdev"-output.}" || continue ;;
			"$IFACE") single="$irq $n"; continue ;;
			*) continue ;;
			esac
		else
			case $n in
			"$IFACE"-*) ;;
			"$IFACE") single="$irq $n"; continue ;;
			*) continue ;;
			esac
		fi
		IRQS="${IRQS:+$IRQS
}$irq $n"
	done 2>/dev/null <"$PROC/interrupts"
	[ -n "$IRQS" ] || IRQS=$single
}

# ---- plan and apply ----
[ "$DRY" = 1 ] && echo "nic.sh: dry run, nothing is changed"

if [ -n "$RSS" ]; then
	echo "rss: $RSS channels on $IFACE"
	if have_ethtool; then
		run "$ETHTOOL" -L "$IFACE" combined "$RSS" ||
			run "$ETHTOOL" -L "$IFACE" rx "$RSS" tx "$RSS" ||
			{ warn "$DRIVER: cannot set $RSS channels"; FAILED=1; }
	else
		warn "--rss needs ethtool"
		FAILED=1
	fi
fi

count_queues rx
NRX=$NQ
count_queues tx
NTX=$NQ
list_irqs
NIRQ=0
old_ifs=$IFS
IFS='
'
for l in $IRQS; do NIRQ=$((NIRQ + 1)); done
IFS=$old_ifs
echo "nic.sh: $IFACE: driver $DRIVER, $NRX rx / $NTX tx queues, $NCPU online CPUs ($CPUS), $NIRQ queue IRQs"

# irqbalance would rewrite the affinity we set.  `read`, not `$(cat)`: one fork per
# process costs seconds on a busy host (and under emulation).
IRQBAL=
for d in "$PROC"/[0-9]*; do
	[ -r "$d/comm" ] && read -r comm 2>/dev/null <"$d/comm" && [ "$comm" = irqbalance ] && IRQBAL="$IRQBAL ${d##*/}"
done
if [ -n "$IRQBAL" ]; then
	echo "irqbalance: running (pid$IRQBAL), stopping it"
	if [ -n "$ROOT" ]; then
		echo "  fake root: not signalling pid$IRQBAL"
	elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
		run systemctl stop irqbalance || FAILED=1
	elif command -v service >/dev/null 2>&1; then
		run service irqbalance stop || FAILED=1
	else
		run kill $IRQBAL || FAILED=1
	fi
else
	echo "irqbalance: not running"
fi

if [ "$NIRQ" -eq 0 ]; then
	warn "no IRQs of $IFACE in /proc/interrupts (legacy INTx or polling?)"
else
	echo "irq affinity: round-robin over CPUs"
	k=0
	# A here-document, not a pipe: the loop runs in this shell (no fork, FAILED kept).
	while read -r irq name; do
		[ -n "$irq" ] || continue
		q=${name##*[!0-9]} # queue number at the end of the name, if any
		is_num "$q" || q=$k
		nth $((q % NCPU)) $CPUS
		cpu=$NTH
		echo " irq $irq ($name) -> cpu $cpu"
		cpumask "$cpu"
		put "$PROC/irq/$irq/smp_affinity" "$MASK"
		k=$((k + 1))
	done <<EOF
$IRQS
EOF
fi

if [ "$NTX" -gt 0 ] && [ ! -e "$NET/queues/tx-0/xps_cpus" ]; then
	echo "xps: skipped (this kernel has no xps_cpus)"  # 2.6.32: XPS came in 2.6.38
elif [ "$NTX" -ge "$NCPU" ] && [ "$NTX" -gt 0 ]; then
	echo "xps: one CPU per tx queue ($NTX tx queues >= $NCPU CPUs)"
	j=0
	while [ $j -lt "$NTX" ]; do
		nth $((j % NCPU)) $CPUS
		cpumask "$NTH"
		put "$NET/queues/tx-$j/xps_cpus" "$MASK"
		j=$((j + 1))
	done
else
	echo "xps: skipped ($NTX tx queues < $NCPU CPUs)"
fi

cpumask $CPUS
ALL=$MASK
if [ "$NRX" -gt 0 ] && [ ! -e "$NET/queues/rx-0/rps_cpus" ]; then
	echo "rps: skipped (this kernel has no rps_cpus)"
elif [ "$NRX" -ne "$NCPU" ]; then
	echo "rps: all CPUs on every rx queue ($NRX rx queues != $NCPU CPUs), rfs on"
	put "$PROC/sys/net/core/rps_sock_flow_entries" 32768
	j=0
	while [ $j -lt "$NRX" ]; do
		put "$NET/queues/rx-$j/rps_cpus" "$ALL"
		put "$NET/queues/rx-$j/rps_flow_cnt" $((32768 / NRX))
		j=$((j + 1))
	done
else
	echo "rps: off (one rx queue per CPU)"
	j=0
	while [ $j -lt "$NRX" ]; do
		put "$NET/queues/rx-$j/rps_cpus" 0
		j=$((j + 1))
	done
fi

if [ "$COALESCE" -gt 0 ]; then
	if have_ethtool; then
		echo "coalescing: rx-usecs $COALESCE"
		run "$ETHTOOL" -C "$IFACE" rx-usecs "$COALESCE" ||
			warn "$DRIVER does not support interrupt coalescing settings"
	else
		echo "coalescing: skipped (no ethtool)"
	fi
fi

[ "$DRY" = 1 ] && echo "nic.sh: dry run done" || echo "nic.sh: done"
[ "$FAILED" = 0 ] || exit 1
exit 0
