# Shell pieces shared by the benchmark scripts (sourced, not run).

# install_missing COMMAND:PACKAGE…: install from Debian, with apt-get, the packages whose
# command is missing (the package's own service is not started: the scripts start their own).
install_missing() {
    local need=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
    done
    [ ${#need[@]} -gt 0 ] || return 0
    echo "installing ${need[*]} (Debian packages)" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq "${need[@]}" >&2
}

# free_port: a TCP port free on 127.0.0.1 now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (fails after 30 s).
wait_port() {
    for _ in $(seq 1 300); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1 after 30 s" >&2
    return 1
}

# cleanup_at_exit DIR: when the script exits, stop the processes listed in the array `pids`
# (add each with `pids+=($!)` after starting it) and remove DIR.
pids=()
cleanup_at_exit() {
    cleanup_dir=$1
    trap cleanup_now EXIT
}
cleanup_now() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$cleanup_dir"
}
