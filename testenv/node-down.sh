# Teardown of the node of `testenv/up node`, sourced by testenv/down (DIR and
# stop_pidfile from there). Order matters: no new pods (controller-manager and
# scheduler stopped), the node's pods deleted while the kubelet still runs,
# kubelet stopped, containers killed, containerd and its shims stopped, then
# what the kubelet changed outside DIR is put back: mounts, cgroups, sysctls,
# /var/lib/kubelet/device-plugins/kubelet.sock.
# shellcheck shell=bash

NODE_DIR="$DIR/node"
CTD_SOCK="$NODE_DIR/ctd/containerd.sock"

stop_pidfile "$DIR/pids/kube-controller-manager.pid"
stop_pidfile "$DIR/pids/kube-scheduler.pid"

node_api() {
  local url
  url="$(sed -n 's/^export MESHCA_TESTENV_APISERVER=//p' "$DIR/env" 2>/dev/null)"
  [[ -n "$url" ]] || url="$(awk '/server:/ {print $2; exit}' "$DIR/admin.kubeconfig" 2>/dev/null)"
  [[ -n "$url" ]] || return 1
  curl -fsS --max-time 10 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
    --key "$DIR/pki/admin.key" "$@" "$url$(printf '%s' "${NODE_API_PATH:?}")"
}
node_pods() { # "namespace/name" of every pod bound to the node
  NODE_API_PATH="/api/v1/pods?fieldSelector=spec.nodeName%3D127.0.0.1" node_api |
    jq -r '.items[] | .metadata.namespace + "/" + .metadata.name'
}

kubelet_pid="$(cat "$DIR/pids/kubelet.pid" 2>/dev/null || true)"
if [[ "$kubelet_pid" =~ ^[0-9]+$ ]] && kill -0 "$kubelet_pid" 2>/dev/null && pods="$(node_pods)"; then
  if [[ -n "$pods" ]]; then
    log "deleting the node's pods: $(echo "$pods" | tr '\n' ' ')"
    while IFS=/ read -r ns name; do
      NODE_API_PATH="/api/v1/namespaces/$ns/pods/$name?gracePeriodSeconds=1" \
        node_api -X DELETE -o /dev/null || true
    done <<<"$pods"
    deadline=$((SECONDS + 60))
    while [[ -n "$(node_pods 2>/dev/null)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
    left="$(node_pods 2>/dev/null || true)"
    [[ -z "$left" ]] || log "pods still there after 60 s (the kubelet did not confirm): $left"
  fi
fi
stop_pidfile "$DIR/pids/kubelet.pid"

# Whatever is still running in containerd (pods the kubelet did not finish).
if [[ -S "$CTD_SOCK" ]]; then
  ctr_() { timeout 20 ctr --address "$CTD_SOCK" --namespace k8s.io "$@"; }
  for t in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
  for t in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true
  done
  for c in $(ctr_ containers ls -q 2>/dev/null); do
    ctr_ containers delete "$c" >/dev/null 2>&1 || true
  done
fi
stop_pidfile "$DIR/pids/containerd.pid"

# Shims outlive containerd (they are reparented); ours name our socket. By pid only.
for p in /proc/[0-9]*; do
  pid="${p#/proc/}"
  cmd="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
  [[ "$cmd" == *containerd-shim* && "$cmd" == *"$CTD_SOCK"* ]] || continue
  log "stopping containerd shim pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
done

# Mounts below DIR: the kubelet's bind mount of its root dir, pod volumes
# (tmpfs), containerd's overlay rootfs and shm. Deepest first.
mapfile -t mounts < <(awk '{print $5}' /proc/self/mountinfo | grep -F -- "$DIR/" |
  awk '{print length($0) " " $0}' | sort -rn | cut -d' ' -f2- | uniq)
for m in "${mounts[@]}"; do
  m="$(printf '%b' "${m//\\/\\0}")" # mountinfo escapes spaces etc. as \ooo
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
done
# A bind mount may appear more than once: repeat until none is left.
for _ in 1 2 3; do
  mapfile -t mounts < <(awk '{print $5}' /proc/self/mountinfo | grep -F -- "$DIR/" | sort -r)
  ((${#mounts[@]})) || break
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
done

# The kubepods cgroup trees (cgroupfs driver), in every controller, deepest first.
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
  [[ -d "$root" ]] || continue
  find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  [[ -d "$root" ]] && log "could not remove $root (processes left in it?)"
done

# sysctls the kubelet set at start.
if [[ -f "$NODE_DIR/sysctls.saved" ]]; then
  while IFS='=' read -r key value; do
    [[ -n "$key" ]] || continue
    if [[ "$(sysctl -n "$key" 2>/dev/null)" != "$value" ]]; then
      sysctl -q -w "$key=$value" >/dev/null 2>&1 || log "could not restore $key=$value"
    fi
  done <"$NODE_DIR/sysctls.saved"
fi

rm -f /var/lib/kubelet/device-plugins/kubelet.sock
# The kubelet's symlinks to its containers' logs (which live in DIR).
if [[ -d /var/log/containers ]]; then
  for l in /var/log/containers/*.log; do
    [[ -L "$l" && "$(readlink "$l")" == "$DIR/"* ]] && rm -f "$l"
  done
fi
# Directories that did not exist before testenv/up node, deepest first.
if [[ -f "$NODE_DIR/created-dirs" ]]; then
  while read -r d; do
    case "$d" in
      /run/containerd) rm -rf --one-file-system /run/containerd ;;
      /var/lib/kubelet* | /var/log/containers) find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true ;;
    esac
  done < <(sort -r "$NODE_DIR/created-dirs")
fi
