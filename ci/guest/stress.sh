# fsbuild stress suite (`fsbuild smoke --suite stress`): sourced by ci/guest/init after the
# smoke checks, so check/step/oneline/load/kill_named and IGB/IRQS/NCPU are the init's.
# Every scenario is one check `stress_<name>` with a bounded duration (timeout) and its
# counts in the detail. Client: `fsstress load` checks every response (200, Content-Length
# body). Servers run under LD_PRELOAD=/lib/libsocket.so with all three features on.
# Pass: 0 failed requests, 0 resets; the final checks: dmesg clean (KASAN, lockdep, RCU,
# list, object debug, WARN), module refcount 0, sockets back to the baseline.

S_SECS=${STRESS_SECS:-8}          # load duration per scenario
S_CONNS=${STRESS_CONNS:-8}        # client threads
S_BOUND=$((S_SECS * 4 + 30))      # hard limit per scenario
S_PORT=${STRESS_PORT:-8090}
S_BIN=${STRESS_BIN:-/bin}         # tests/test_stress.py runs the scenarios on the host
S_PRE=${STRESS_PRELOAD-/lib/libsocket.so}
S_TMP=${STRESS_TMP:-/tmp}
S_PARAMS="enable_listen_spawn=2 enable_fast_epoll=1 enable_receive_flow_deliver=1"

# tcp_in_use: the TCP line of /proc/net/sockstat without TIME_WAIT (those expire on their own)
tcp_in_use() { while read -r p _ n _ o _; do [ "$p" = TCP: ] && echo "inuse=$n orphan=$o"; done < /proc/net/sockstat; }
# snmp NAME...: values of /proc/net/netstat TcpExt and /proc/net/snmp Tcp counters, in order
snmp() {
	cat /proc/net/netstat /proc/net/snmp | awk -v want="$*" '
		$1 == "TcpExt:" || $1 == "Tcp:" { if (!($1 in hdr)) { for (i = 2; i <= NF; i++) col[$1, $i] = i; hdr[$1] = 1; next }
			for (i = 2; i <= NF; i++) val[$1, i] = $i }
		END { n = split(want, w, " "); for (k = 1; k <= n; k++) {
			v = ("TcpExt:" SUBSEP w[k]) in col ? val["TcpExt:", col["TcpExt:", w[k]]] : val["Tcp:", col["Tcp:", w[k]]]
			printf "%s%s", (k > 1 ? " " : ""), (v == "" ? 0 : v) } print "" }'
}
# kv KEY LINE [DEFAULT]: the value of KEY=... in LINE (DEFAULT, else 0, when absent)
kv() { _v=$(echo "$2" | tr ' ' '\n' | grep "^$1=" | head -n 1 | cut -d= -f2); echo "${_v:-${3:-0}}"; }
fs_loaded() { grep -q '^fastsocket ' /proc/modules; }
fs_refcnt() { while read -r m _ r _; do [ "$m" = fastsocket ] && echo "$r"; done < /proc/modules; }
wait_port() {
	_p=$(printf '%04X' "$1"); _i=0
	while ! grep -q ":$_p 00000000:0000 0A" /proc/net/tcp && [ $_i -lt 150 ]; do sleep 0.1; _i=$((_i + 1)); done
	[ $_i -lt 150 ]
}

# bwait PID SECS: wait at most SECS for PID, then SIGKILL it; a process stuck in the kernel
# (D state after an oops) is left behind instead of hanging the suite: rc 125, HUNG says where.
bwait() {
	_w=0; HUNG=""
	while kill -0 "$1" 2>/dev/null && [ $_w -lt $(($2 * 10)) ]; do sleep 0.1; _w=$((_w + 1)); done
	if kill -0 "$1" 2>/dev/null; then
		kill -KILL "$1" 2>/dev/null; sleep 1
		if kill -0 "$1" 2>/dev/null; then
			HUNG="pid $1 stuck in the kernel ($(cat /proc/$1/wchan 2>/dev/null), state $(cut -d' ' -f3 /proc/$1/stat 2>/dev/null))"
			return 125
		fi
	fi
	wait "$1"
}
# bg_run SECS OUTFILE CMD...: CMD bounded by bwait; rc in BRC, output in OUTFILE
bg_run() { _s=$1; _f=$2; shift 2; "$@" > "$_f" 2>&1 & bwait $! "$_s"; BRC=$?; }

# st_serve PRELOAD ARGS...: fsstress serve in the background; SPID = master pid
st_serve() {
	_pre=$1; shift
	(LD_PRELOAD=$_pre exec $S_BIN/fsstress serve -s $S_TMP/serve.stats "$@") > $S_TMP/serve.out 2>&1 &
	SPID=$!
	wait_port "$S_PORT"
}
# port_free PORT SECS: no listener left on PORT within SECS (a stopped server's workers and
# their sockets may take a while to go on a debug kernel under TCG)
port_free() {
	_h=$(printf ':%04X 00000000:0000 0A' "$1"); _w=0
	while grep -q "$_h" /proc/net/tcp 2>/dev/null && [ $_w -lt $(($2 * 10)) ]; do sleep 0.1; _w=$((_w + 1)); done
	! grep -q "$_h" /proc/net/tcp 2>/dev/null
}
# st_stop: stop the master; SERVE = its counters line. Its port must be free again (the
# next scenario binds it): a listener left behind is a failure of this one.
st_stop() {
	kill -TERM "$SPID" 2>/dev/null
	bwait "$SPID" 10 || [ -z "$HUNG" ] || ACT_FAIL="${ACT_FAIL:+$ACT_FAIL; }server $HUNG"
	port_free "$S_PORT" 20 || ACT_FAIL="${ACT_FAIL:+$ACT_FAIL; }port $S_PORT still listening 20 s after the server stopped"
	SERVE=$(grep '^serve: accepted' $S_TMP/serve.stats 2>/dev/null | tail -n 1); rm -f $S_TMP/serve.stats
	[ -n "$SERVE" ] || SERVE="serve: no counters ($(tail -n 2 $S_TMP/serve.out | oneline))"
}
# st_load_bg ARGS...: client in the background (LPID); st_load_wait: LOAD = its result line
st_load_bg() { $S_BIN/fsstress load -c "$S_CONNS" -d "$S_SECS" "$@" > $S_TMP/load.out 2>&1 & LPID=$!; }
st_load_wait() {
	bwait "$LPID" "$S_BOUND"; LRC=$?
	LOAD=$(grep '^load:' $S_TMP/load.out | tail -n 1)
	[ -n "$LOAD" ] || LOAD="load: no result (rc $LRC${HUNG:+, client $HUNG})"
}
# verdict NAME EXTRA_FAIL DETAIL: pass when the client saw no failure and EXTRA_FAIL is empty
verdict() {
	# a missing counter counts as a failure: the client did not report
	_fails=$(( $(kv errors "$LOAD" 1) + $(kv resets "$LOAD" 1) + $(kv timeouts "$LOAD" 1) \
		+ $(kv refused "$LOAD" 1) + $(kv bad "$LOAD" 1) ))
	_d="$(echo "${LOAD#load: }" | oneline) | ${SERVE#serve: }${3:+ | $3}"
	if [ "$LRC" = 0 ] && [ "$_fails" = 0 ] && [ -z "$2" ]; then check "stress_$1" pass "$_d"
	else check "stress_$1" fail "${2:+$2; }$_d"; fi
}
# herd_check: more wakeups that find nothing to accept than accepted connections means a
# worker spins on a queue it cannot drain (a re-pinned worker woken by the local of the
# CPU it left: 3,923 for 295 accepts before the fix) or a herd; a sound server has few.
herd_check() {
	_a=$(kv accepted "$SERVE" 0); _s=$(kv spurious "$SERVE" 0)
	[ "$_s" -le "$_a" ] || ACT_FAIL="${ACT_FAIL:+$ACT_FAIL; }spurious wakeups $_s > accepted $_a"
}
# scenario NAME SERVE_ARGS ACTION [ADDR] [CHECK]: server, client for S_SECS, ACTION (a
# function) meanwhile, CHECK (a function) on the counters once the server stopped
scenario() {
	_name=$1; _sargs=$2; _act=$3; _addr=${4:-127.0.0.1:$S_PORT}; _post=${5:-}
	step "stress $_name"
	SERVE=""; LOAD=""; ACT_FAIL=""; ACT_INFO=""
	if ! st_serve "$S_PRE" $_sargs; then st_stop; check "stress_$_name" fail "server never listened: $SERVE"; return; fi
	st_load_bg -a "$_addr"
	[ -n "$_act" ] && $_act
	st_load_wait
	st_stop
	[ -n "$_post" ] && $_post
	verdict "$_name" "$ACT_FAIL" "$ACT_INFO"
}

# ---- actions run while the client is loading
act_kill() { _k=0; while kill -0 "$LPID" 2>/dev/null && [ $_k -lt 6 ]; do sleep 1; kill -USR2 "$SPID"; _k=$((_k + 1)); done; }
act_reload() { _k=0; while kill -0 "$LPID" 2>/dev/null && [ $_k -lt 3 ]; do sleep 2; kill -HUP "$SPID"; _k=$((_k + 1)); done; }
act_repin() { _k=0; while kill -0 "$LPID" 2>/dev/null && [ $_k -lt 6 ]; do sleep 1; kill -USR1 "$SPID"; _k=$((_k + 1)); done; }
act_storm() {
	bg_run "$S_BOUND" $S_TMP/storm.out $S_BIN/fsstress storm -t 16 -n 40
	ACT_INFO=$(tail -n 1 $S_TMP/storm.out | oneline)
	[ $BRC = 0 ] || ACT_FAIL="storm rc=$BRC${HUNG:+: $HUNG}"
}
act_rmmod() {
	_ok=0; _refused=0
	for _k in 1 2 3 4 5; do
		sleep 1
		if rmmod fastsocket 2>/dev/null; then _ok=$((_ok + 1)); load fastsocket $S_PARAMS; else _refused=$((_refused + 1)); fi
	done
	ACT_INFO="rmmod under load: refused=$_refused unloaded=$_ok"
}
act_params() {
	_bad=""; _n=0
	for pv in enable_listen_spawn=0 enable_listen_spawn=1 enable_listen_spawn=2 enable_fast_epoll=0 \
		enable_fast_epoll=1 enable_receive_flow_deliver=0 enable_receive_flow_deliver=1; do
		_p=${pv%=*}; _v=${pv#*=}; _f=/sys/module/fastsocket/parameters/$_p
		sleep 0.5
		echo "$_v" > "$_f" 2>/dev/null || _bad="$_bad $pv(write)"
		_got=$(cat "$_f" 2>/dev/null); case $_got in Y) _got=1;; N) _got=0;; esac
		[ "$_got" = "$_v" ] || _bad="$_bad $pv(read $_got)"
		_n=$((_n + 1))
	done
	ACT_INFO="$_n parameter writes"
	[ -z "$_bad" ] || ACT_FAIL="parameters:$_bad"
}
act_irq() {
	_rps=/sys/class/net/lo/queues/rx-0/rps_cpus; _k=0; _n=0
	while kill -0 "$LPID" 2>/dev/null && [ $_k -lt 12 ]; do
		_m=$(printf '%x' $((1 << (_k % NCPU))))
		for irq in $IRQS; do echo "$_m" > "/proc/irq/$irq/smp_affinity" 2>/dev/null && _n=$((_n + 1)); done
		# loopback has no IRQ: RPS moves its receive processing, so SYN and ACK land on
		# different CPUs as they do when irqbalance moves a NIC vector.
		[ -w $_rps ] && echo "$_m" > $_rps
		sleep 0.5; _k=$((_k + 1))
	done
	[ -w $_rps ] && echo 0 > $_rps
	ACT_INFO="$_k moves: lo RPS mask + $_n igb IRQ affinity writes"
}

# ---- scenarios

stress_demo() {
	step "stress demo_naive"
	(LD_PRELOAD=$S_PRE exec $S_BIN/server -w 4 -c 0 -a 127.0.0.1:8081) > $S_TMP/demo.out 2>&1 &
	_d=$!; SERVE="demo server naive"
	if wait_port 8081; then st_load_bg -a 127.0.0.1:8081; st_load_wait
	else LOAD="load: demo server never listened"; LRC=1; fi
	kill -TERM $_d; bwait $_d 10
	command -v kill_named >/dev/null && kill_named server   # the init's: no demo worker may linger
	verdict demo_naive "" ""
	# proxy: demo (preloaded) in front of fsstress serve (preloaded)
	step "stress demo_proxy"
	LOAD="load: backend never listened"; LRC=1
	if st_serve "$S_PRE" -p "$S_PORT" -w 2; then
		(LD_PRELOAD=$S_PRE exec $S_BIN/server -w 4 -c 0 -a 127.0.0.1:8082 -x 127.0.0.1:$S_PORT) > $S_TMP/proxy.out 2>&1 &
		_x=$!
		if wait_port 8082; then st_load_bg -a 127.0.0.1:8082; st_load_wait
		else LOAD="load: demo proxy never listened"; LRC=1; fi
		kill -TERM $_x; bwait $_x 10
		command -v kill_named >/dev/null && kill_named server
	fi
	st_stop
	verdict demo_proxy "" "demo proxy -> fsstress serve"
}

# A real server: Debian's nginx (glibc, unpacked from /bin/nginx-root.tar) under the glibc
# libsocket.so, 4 workers; a graceful reload (SIGHUP: new workers, old ones finish) under load.
stress_nginx() {
	step "stress nginx"
	if [ ! -f /bin/nginx-root.tar ]; then check stress_nginx skip "no nginx on the build host (apt-get install nginx-light)"; return; fi
	case $KVER in 2.6.*) check stress_nginx skip "Debian's glibc needs Linux >= 3.2; this guest runs $KVER"; return;; esac
	tar -xf /bin/nginx-root.tar -C / 2>$S_TMP/nginx.tar.err || { check stress_nginx fail "unpack: $(oneline < $S_TMP/nginx.tar.err)"; return; }
	grep -q '^nobody:' /etc/passwd 2>/dev/null || { echo "root:x:0:0::/root:/bin/sh"; echo "nobody:x:65534:65534::/:/bin/false"; } >> /etc/passwd
	grep -q '^nogroup:' /etc/group 2>/dev/null || { echo "root:x:0:"; echo "nogroup:x:65534:"; } >> /etc/group
	_n=$S_TMP/nginx; mkdir -p $_n
	cat > $_n/nginx.conf <<-EOF
	worker_processes 4;
	worker_cpu_affinity 0001 0010 0100 1000;
	daemon off;
	pid $_n/nginx.pid;
	error_log $_n/error.log warn;
	events { worker_connections 512; }
	http {
	    access_log off;
	    client_body_temp_path $_n/body; proxy_temp_path $_n/proxy; fastcgi_temp_path $_n/fcgi;
	    uwsgi_temp_path $_n/uwsgi; scgi_temp_path $_n/scgi;
	    server { listen 127.0.0.1:8083 backlog=1024; location / { return 200 "fsstress nginx\n"; } }
	}
	EOF
	(LD_PRELOAD=/lib/glibc/libsocket.so exec /usr/sbin/nginx -e $_n/error.log -p $_n -c $_n/nginx.conf) > $_n/out 2>&1 &
	_np=$!; SERVE="nginx 4 workers"; LOAD="load: nginx never listened"; LRC=1
	if wait_port 8083; then
		st_load_bg -a 127.0.0.1:8083
		sleep 3; kill -HUP $_np; SERVE="$SERVE, 1 reload under load"
		st_load_wait
	fi
	kill -QUIT $_np; bwait $_np 10
	verdict nginx "" "$(grep -E '\[(alert|emerg|crit)\]' $_n/error.log | head -n 1 | oneline)"
}

stress_netns() {
	step "stress netns"
	# A kernel built without network namespaces (the linux-6.1 mini config) cannot run it.
	if ! $S_BIN/fsstress netns sh -c : > $S_TMP/netns.probe 2>&1 && grep -q 'unshare(CLONE_NEWNET): Invalid argument' $S_TMP/netns.probe; then
		check stress_netns skip "this kernel has no network namespaces (CONFIG_NET_NS off: unshare(CLONE_NEWNET) fails with EINVAL)"; return
	fi
	# Same port in both namespaces at once, RFD on: each namespace's steering must be its own.
	st_serve "$S_PRE" -p "$S_PORT" -w 2
	st_load_bg -a "127.0.0.1:$S_PORT"
	_hex=$(printf '%04X' "$S_PORT")
	bg_run "$S_BOUND" $S_TMP/netns.out $S_BIN/fsstress netns sh -c "
		(LD_PRELOAD=$S_PRE exec $S_BIN/fsstress serve -p $S_PORT -w 2 -s $S_TMP/ns.stats) > $S_TMP/ns.serve 2>&1 &
		p=\$!; i=0
		while ! grep -q ':$_hex 00000000:0000 0A' /proc/net/tcp && [ \$i -lt 150 ]; do sleep 0.1; i=\$((i + 1)); done
		$S_BIN/fsstress load -a 127.0.0.1:$S_PORT -c 4 -d $S_SECS; r=\$?; kill -TERM \$p; wait \$p; exit \$r"
	_r=$BRC; _o=$(cat $S_TMP/netns.out)
	st_load_wait; st_stop
	_ns=$(echo "$_o" | grep '^load:' | tail -n 1)
	_f=""; [ $_r = 0 ] || _f="netns rc=$_r: $(echo "$_o" | tail -n 2 | oneline)"
	_nf=$(( $(kv errors "$_ns" 1) + $(kv resets "$_ns" 1) + $(kv bad "$_ns" 1) + $(kv timeouts "$_ns" 1) ))
	[ "$_nf" = 0 ] || _f="${_f:+$_f; }netns client failures=$_nf"
	verdict netns "$_f" "netns: ${_ns#load: }"
}

# hostile_cmd [TASKS_FILE]: the unprivileged caller, in the cpuset whose tasks file is given
# (none on a kernel without cpusets, e.g. the linux-6.1 mini config), pinned to CPU 0
hostile_cmd() {
	echo "${1:+echo \$\$ > $1; }exec taskset 1 $S_BIN/fsstress hostile -u 65534"
}

stress_hostile() {
	step "stress hostile"
	# A cpuset holding CPU 0 only; the tool drops to uid 65534 inside it.
	_cs=""; _join=""
	mkdir -p /dev/cpuset /dev/cg2
	if { grep -q ' /dev/cpuset ' /proc/mounts || mount -t cgroup -o cpuset cgroup /dev/cpuset 2>/dev/null; } \
		&& mkdir -p /dev/cpuset/jail && echo 0 > /dev/cpuset/jail/cpuset.cpus 2>/dev/null \
		&& echo 0 > /dev/cpuset/jail/cpuset.mems 2>/dev/null; then _cs="cgroup v1 cpuset {0}"; _join=/dev/cpuset/jail/tasks
	elif { grep -q ' /dev/cg2 ' /proc/mounts || mount -t cgroup2 cgroup2 /dev/cg2 2>/dev/null; } \
		&& echo +cpuset > /dev/cg2/cgroup.subtree_control 2>/dev/null && mkdir -p /dev/cg2/jail \
		&& echo 0 > /dev/cg2/jail/cpuset.cpus 2>/dev/null; then _cs="cgroup v2 cpuset {0}"; _join=/dev/cg2/jail/cgroup.procs
	fi
	bg_run "$S_BOUND" $S_TMP/hostile.out sh -c "$(hostile_cmd "$_join")"
	_r=$BRC; _o="$(cat $S_TMP/hostile.out)${HUNG:+ | $HUNG}"
	_res=$(echo "$_o" | grep '^hostile:' | tail -n 1)
	_d="${_cs:-no cpuset support: taskset to CPU 0}; $(echo "${_res:-$_o}" | oneline)"
	if [ $_r = 0 ] && [ -n "$_res" ]; then check stress_hostile pass "$_d"; else check stress_hostile fail "rc=$_r; $_d"; fi
}

# cpu_metrics SERVE LOAD: spurious wakeups and where connections were handled, from the
# counter lines of serve and load. The SYN's and a reply's CPU come from SO_INCOMING_CPU
# (Linux >= 3.19): on an older kernel (el6) those metrics are left out, never reported as 0,
# and cpu_metrics_na SERVE says why.
cpu_metrics() {
	_acc=$(kv accepted "$1"); _known=$(kv syn_known "$1" "$_acc")
	awk -v a="$_acc" -v s="$(kv on_syn_cpu "$1")" -v k="$_known" -v p="$(kv spurious "$1")" \
		-v n="$(kv rfd_seen "$2")" -v l="$(kv rfd_local "$2")" 'BEGIN {
		d = (a > 0) ? a : 1
		printf "spurious_per_accept=%.3f", p / d
		if (k > 0) printf " syn_cpu_share=%.3f cross_cpu=%d", s / d, a - s
		if (n > 0) printf " rfd_share=%.3f", l / n }'
}
cpu_metrics_na() {
	[ "$(kv syn_known "$1" 1)" = 0 ] && [ "$(kv accepted "$1")" != 0 ] &&
		echo "; syn_cpu_share, cross_cpu, rfd_share: n/a (no SO_INCOMING_CPU before Linux 3.19)"
}

# metrics PRELOAD LABEL: the same workload with and without Fastsocket, mechanism counters
stress_metrics() {
	_pre=$1; _label=$2
	step "stress metrics_$_label"
	_b=$(snmp ListenDrops ListenOverflows OutRsts EstabResets)
	if st_serve "$_pre" -p "$S_PORT" -w 4; then st_load_bg -a "127.0.0.1:$S_PORT"; st_load_wait
	else LOAD="load: server never listened"; LRC=1; fi
	st_stop
	set -- $(snmp ListenDrops ListenOverflows OutRsts EstabResets) $_b
	_m="conns_per_s=$(kv rps "$LOAD") $(cpu_metrics "$SERVE" "$LOAD") resets=$(($3 - $7)) estab_resets=$(($4 - $8))"
	_m="$_m listen_drops=$(($1 - $5)) listen_overflows=$(($2 - $6))"
	verdict "metrics_$_label" "" "metrics: $_m$(cpu_metrics_na "$SERVE")"
}

# dmesg_reports: the lines of a kernel log (stdin) that are a debug report. Debug kernels
# report in their own words; any of them fails the suite. Two boot-time notices of the el6
# debug kernel share those words and report nothing: kmemleak built in but off at boot
# (ci/configs/el6-debug.config says why) and debug objects moving their static pool.
dmesg_reports() {
	grep -E 'BUG:|WARNING:|KASAN|KFENCE|possible circular|possible recursive|inconsistent lock|suspicious RCU|list_add corruption|list_del corruption|ODEBUG|refcount_t:|kmemleak|sleeping function called|INFO: task|Oops|general protection|unreferenced object' |
		grep -vE 'kmemleak: Kernel memory leak detector disabled$|ODEBUG: [0-9]+ of [0-9]+ active objects replaced$'
}

stress_final() {
	step "stress final"
	_f=""
	if fs_loaded; then
		_rc=$(fs_refcnt)
		[ "$_rc" = 0 ] || _f="refcount $_rc with every server stopped"
		rmmod fastsocket 2>$S_TMP/rmmod.err || _f="${_f:+$_f; }rmmod: $(oneline < $S_TMP/rmmod.err)"
	else _f="fastsocket was no longer loaded at the end"; fi
	[ -e /proc/net/fastsocket ] && _f="${_f:+$_f; }/proc/net/fastsocket left after rmmod"
	# FIN_WAIT/LAST_ACK of the last connections take a moment under TCG
	_i=0; while [ "$(tcp_in_use)" != "$S_BASE" ] && [ $_i -lt 20 ]; do sleep 0.5; _i=$((_i + 1)); done
	_now=$(tcp_in_use)
	[ "$_now" = "$S_BASE" ] || _f="${_f:+$_f; }sockstat TCP $_now, baseline $S_BASE"
	if [ -z "$_f" ]; then check stress_leaks pass "refcount 0, rmmod clean, sockstat TCP $_now (baseline)"
	else check stress_leaks fail "$_f"; fi
	_hits=$(dmesg | dmesg_reports)
	if [ -z "$_hits" ]; then check stress_dmesg pass "no KASAN/KFENCE/lockdep/RCU/list/ODEBUG/refcount/WARN report"
	else check stress_dmesg fail "$(echo "$_hits" | head -n 3 | oneline)"; fi
}

run_stress() {
	if [ ! -x $S_BIN/fsstress ] || [ ! -f "$S_PRE" ] || [ "$FASTSOCKET_KO" != 1 ]; then
		check stress_suite fail "cannot run: fsstress=$([ -x $S_BIN/fsstress ] && echo y || echo n) libsocket=$([ -f $S_PRE ] && echo y || echo n) fastsocket.ko=$FASTSOCKET_KO"
		return
	fi
	S_BASE=$(tcp_in_use)
	stress_metrics "" plain
	fs_loaded || load fastsocket $S_PARAMS || { check stress_suite fail "modprobe fastsocket: $(echo "$_out" | oneline)"; return; }
	stress_metrics "$S_PRE" fastsocket
	stress_demo
	stress_nginx
	scenario churn_kill "-p $S_PORT -w 4" act_kill
	scenario reload "-p $S_PORT -w 4" act_reload
	scenario repin "-p $S_PORT -w 4" act_repin "" herd_check
	scenario two_listeners "-p $S_PORT,$((S_PORT + 1)) -w 4" "" "127.0.0.1:$S_PORT,127.0.0.1:$((S_PORT + 1))"
	scenario mixed_accept "-p $S_PORT -w 4 -m" ""
	scenario exec_child "-p $S_PORT -w 4 -e" ""
	scenario params "-p $S_PORT -w 4" act_params
	scenario irq_move "-p $S_PORT -w 4" act_irq
	stress_netns
	scenario rmmod "-p $S_PORT -w 4" act_rmmod
	# hostile input and ioctl storms last: an oops there must not hide the other results
	stress_hostile
	scenario spawn_storm "-p $S_PORT -w 4" act_storm
	stress_final
}
[ "${STRESS_SOURCE_ONLY:-0}" = 1 ] || run_stress
