#!/bin/sh
# http_load.sh N URL [SECS]: run N parallel HTTP load tasks against URL for SECS seconds
# (default 5) and print the total requests/s and errors.  Tool: $HTTP_LOAD_TOOL, else the
# first found of http_load, wrk, ab (Debian: wrk, apache2-utils), loadgen (demo/).
# Each task opens $HTTP_LOAD_CONNS connections (default 4).  POSIX sh (busybox ash too).
# Last line (machine readable):
#   http_load: tool=T tasks=N secs=S requests=R errors=E rps=X
# Exit status: 0 when every task ran and no request failed, 1 otherwise, 2 on bad usage.
set -u

usage() {
	echo "usage: http_load.sh N URL [SECS]   (env: HTTP_LOAD_TOOL=http_load|wrk|ab|loadgen, HTTP_LOAD_CONNS=4)" >&2
	exit 2
}

[ $# -ge 2 ] && [ $# -le 3 ] || usage
N=$1
URL=$2
SECS=${3:-5}
CONNS=${HTTP_LOAD_CONNS:-4}
case $N in '' | *[!0-9]*) usage ;; esac
case $SECS in '' | *[!0-9]*) usage ;; esac
case $CONNS in '' | *[!0-9]*) usage ;; esac
[ "$N" -ge 1 ] && [ "$SECS" -ge 1 ] && [ "$CONNS" -ge 1 ] || usage
case $URL in http://*) ;; *) echo "http_load.sh: URL must start with http://" >&2; exit 2 ;; esac
# ab insists on a path
case ${URL#http://} in */*) ;; *) URL=$URL/ ;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
find_loadgen() {
	for p in "${LOADGEN:-}" "$HERE/build/loadgen" "$HERE/loadgen" "$(command -v loadgen 2>/dev/null)"; do
		[ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return 0; }
	done
	return 1
}

TOOL=${HTTP_LOAD_TOOL:-}
if [ -z "$TOOL" ]; then
	for t in http_load wrk ab; do
		command -v $t >/dev/null 2>&1 && { TOOL=$t; break; }
	done
	[ -n "$TOOL" ] || { find_loadgen >/dev/null && TOOL=loadgen; }
fi
case $TOOL in
http_load | wrk | ab) command -v "$TOOL" >/dev/null 2>&1 || { echo "http_load.sh: $TOOL not installed" >&2; exit 1; } ;;
loadgen) LG=$(find_loadgen) || { echo "http_load.sh: loadgen not built (make -C demo)" >&2; exit 1; } ;;
'') echo "http_load.sh: no load tool: install wrk or apache2-utils, or build demo/loadgen" >&2; exit 1 ;;
*) echo "http_load.sh: unknown HTTP_LOAD_TOOL=$TOOL" >&2; exit 2 ;;
esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/http_load.XXXXXX") || exit 1
PIDS=
cleanup() {
	for p in $PIDS; do kill "$p" 2>/dev/null; done
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One task; prints "requests errors" on its last line.
run_task() {
	out=$TMP/task$1.out
	case $TOOL in
	wrk)
		wrk -t1 -c"$CONNS" -d"${SECS}s" "$URL" >"$out" 2>&1
		awk '/ requests in /{r=$1}
		     /Socket errors:/{gsub(/,/,""); e+=$4+$6+$8+$10}
		     /Non-2xx or 3xx responses:/{e+=$NF}
		     END{printf "%d %d\n", r, e}' "$out"
		;;
	ab)
		ab -q -t "$SECS" -n 100000000 -c "$CONNS" "$URL" >"$out" 2>&1
		awk '/^Complete requests:/{r=$3}
		     /^Failed requests:/{e+=$3}
		     /^Non-2xx responses:/{e+=$3}
		     END{printf "%d %d\n", r-e, e}' "$out"
		;;
	http_load)
		printf '%s\n' "$URL" >"$TMP/urls$1"
		http_load -parallel "$CONNS" -seconds "$SECS" "$TMP/urls$1" >"$out" 2>&1
		awk '/ fetches, /{r=$1}
		     /^  code [0-9]+ -- /{if ($2 !~ /^2/) e+=$4}
		     /^http_load: /{e++}
		     END{printf "%d %d\n", r-e, e}' "$out"
		;;
	loadgen)
		"$LG" -d "$SECS" -c "$CONNS" "$URL" >"$out" 2>&1
		awk '/^loadgen: requests=/{split($2,a,"="); split($3,b,"="); r=a[2]; e=b[2]}
		     END{printf "%d %d\n", r, e}' "$out"
		;;
	esac
}

i=1
while [ "$i" -le "$N" ]; do
	run_task "$i" >"$TMP/task$i.res" &
	PIDS="$PIDS $!"
	i=$((i + 1))
done
for p in $PIDS; do wait "$p"; done
PIDS=

REQ=0
ERR=0
i=1
while [ "$i" -le "$N" ]; do
	set -- $(cat "$TMP/task$i.res" 2>/dev/null) x x
	if [ "$1" = x ] || { [ "$1" = 0 ] && [ "$2" = 0 ]; }; then
		echo "http_load.sh: task $i produced no result:" >&2
		sed 's/^/  /' "$TMP/task$i.out" >&2
		ERR=$((ERR + 1))
	else
		echo "task $i: requests=$1 errors=$2"
		REQ=$((REQ + $1))
		ERR=$((ERR + $2))
	fi
	i=$((i + 1))
done
RPS=$(awk -v r="$REQ" -v s="$SECS" 'BEGIN{printf "%.0f", r / s}')
echo "http_load: tool=$TOOL tasks=$N secs=$SECS requests=$REQ errors=$ERR rps=$RPS"
[ "$ERR" -eq 0 ]
