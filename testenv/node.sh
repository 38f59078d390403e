# The node of `testenv/up node`: kube-controller-manager, kube-scheduler, a
# private containerd (+ runc) and a kubelet named 127.0.0.1. Sourced by testenv/up
# after kube-apiserver is ready; uses its DIR, API_URL, ports and helpers.
# testenv/down undoes what the kubelet changes outside DIR (see testenv/README.md).
# shellcheck shell=bash

for b in kube-controller-manager kube-scheduler kubelet; do
  [[ -x "$TESTENV_BIN/$b" ]] || die "$TESTENV_BIN/$b missing after testenv/build node"
done
for b in containerd containerd-shim-runc-v2 ctr runc gcc jq; do
  command -v "$b" >/dev/null || die "$b is needed for the node (testenv/build node installs containerd and runc)"
done
[[ $(id -u) == 0 ]] || die "the node needs root (kubelet, containerd)"

NODE_DIR="$DIR/node"
CTD_SOCK="$NODE_DIR/ctd/containerd.sock"
PAUSE_IMAGE="docker.io/library/pause:meshca"
mkdir -p "$NODE_DIR"/{ctd,cni/bin,cni/net.d,kubelet/pki,podlogs,images}

# One node per machine: kubelets share /sys/fs/cgroup/*/kubepods and
# /var/lib/kubelet/device-plugins. The lock is held by every process started
# from here on (they inherit fd 8) and freed when the last one has stopped.
NODE_LOCK=/run/meshca-testenv-node.lock
exec 8>"$NODE_LOCK"
if ! flock -n 8; then
  die "another testenv node is running on this machine (lock $NODE_LOCK held by pids: $(fuser "$NODE_LOCK" 2>/dev/null || echo '?')); stop it with testenv/down"
fi

# What the kubelet changes outside its directories, recorded for testenv/down.
{
  for s in vm.overcommit_memory kernel.panic kernel.panic_on_oops; do
    printf '%s=%s\n' "$s" "$(sysctl -n "$s")"
  done
} >"$NODE_DIR/sysctls.saved"
for d in /var/lib/kubelet /var/lib/kubelet/device-plugins /run/containerd /var/log/containers; do
  [[ -e "$d" ]] || printf '%s\n' "$d" >>"$NODE_DIR/created-dirs"
done
touch "$NODE_DIR/created-dirs"

# --- kube-controller-manager and kube-scheduler ------------------------------------------
kubeconfig "$NODE_DIR/kube-controller-manager.kubeconfig" kube-controller-manager
kubeconfig "$NODE_DIR/kube-scheduler.kubeconfig" kube-scheduler
kubeconfig "$NODE_DIR/kubelet.kubeconfig" kubelet

# csrsigning/csrapproving are off: the kubelet's certificates are issued here,
# and meshca's signer tests expect no other signer to act on CSRs.
start kube-controller-manager "$TESTENV_BIN/kube-controller-manager" \
  --kubeconfig="$NODE_DIR/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$NODE_DIR/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$NODE_DIR/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --cert-dir="$NODE_DIR/kcm-certs" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$DIR/pki/sa.key" \
  --root-ca-file="$DIR/pki/ca.crt" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --controllers='*,-csrsigning,-csrapproving' \
  --feature-gates=ClusterTrustBundle=true,PodCertificateRequest=true \
  --profiling=false \
  --v=1
start kube-scheduler "$TESTENV_BIN/kube-scheduler" \
  --kubeconfig="$NODE_DIR/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$NODE_DIR/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$NODE_DIR/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$SCHED_PORT" \
  --leader-elect=false \
  --profiling=false \
  --v=1

# --- containerd ------------------------------------------------------------------------------
# Loopback-only CNI config: the runtime reports its network ready so the node
# becomes Ready. hostNetwork pods never call CNI; no plugin binary is installed.
printf '%s\n' '{"cniVersion": "0.4.0", "name": "hostonly-dummy", "plugins": [{"type": "loopback"}]}' \
  >"$NODE_DIR/cni/net.d/10-hostonly.conflist"
cat >"$NODE_DIR/ctd/config.toml" <<EOF
version = 2
root = "$NODE_DIR/ctd/root"
state = "$NODE_DIR/ctd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "$CTD_SOCK"

[ttrpc]
  address = "$CTD_SOCK.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$NODE_DIR/ctd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails
    # (runc: "can't get final child's PID from pipe: EOF").
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$NODE_DIR/cni/bin"
      conf_dir = "$NODE_DIR/cni/net.d"
EOF
cat >"$NODE_DIR/ctr" <<EOF
#!/bin/sh
# ctr on this testenv's containerd, namespace k8s.io (the kubelet's).
exec ctr --address $(printf '%q' "$CTD_SOCK") --namespace k8s.io "\$@"
EOF
chmod 755 "$NODE_DIR/ctr"
start containerd containerd --config "$NODE_DIR/ctd/config.toml"
wait_for containerd 30 "$NODE_DIR/ctr" version
log "containerd ready at $CTD_SOCK"

# The sandbox image: built here (a static C pause, ~2 s), never pulled.
"$TESTENV_ROOT/../deploy/image/build" pause --out "$NODE_DIR/images/pause.oci.tar" >/dev/null 2>"$DIR/logs/pause-image.log" ||
  die "building the pause image failed (see $DIR/logs/pause-image.log)"
"$NODE_DIR/ctr" images import "$NODE_DIR/images/pause.oci.tar" >"$DIR/logs/ctr-import.log" 2>&1 ||
  die "ctr images import of the pause image failed (see $DIR/logs/ctr-import.log)"
images="$("$NODE_DIR/ctr" images ls -q)" || die "ctr images ls failed"
grep -qxF "$PAUSE_IMAGE" <<<"$images" || die "$PAUSE_IMAGE not in containerd after import"

# --- kubelet ---------------------------------------------------------------------------------
cat >"$NODE_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $DIR/pki/ca.crt
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
resolvConf: ""
clusterDomain: cluster.local
containerRuntimeEndpoint: unix://$CTD_SOCK
imageServiceEndpoint: unix://$CTD_SOCK
enforceNodeAllocatable: []
cgroupsPerQOS: true
localStorageCapacityIsolation: true
serializeImagePulls: false
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  imagefs.available: "0%"
  nodefs.inodesFree: "0%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
featureGates:
  PodCertificateRequest: true
  # clusterTrustBundle projected volume sources (beta, off by default).
  ClusterTrustBundle: true
  ClusterTrustBundleProjection: true
podLogsDir: $NODE_DIR/podlogs
# The pod-certificate scale benchmark runs 500 pods on this one node (the
# default is 110).
maxPods: ${MESHCA_TESTENV_MAX_PODS:-600}
# Projected volumes (podCertificate, clusterTrustBundle) are rewritten on a
# pod's periodic sync: 15 s instead of 1 min, so that a refreshed credential
# reaches the pod's files soon after the kubelet got it.
syncFrequency: 15s
protectKernelDefaults: false
EOF
# The name 127.0.0.1 gives the Node InternalIP 127.0.0.1 without a DNS lookup
# (--node-ip refuses loopback).
start kubelet "$TESTENV_BIN/kubelet" \
  --config="$NODE_DIR/kubelet/config.yaml" \
  --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
  --hostname-override=127.0.0.1 \
  --root-dir="$NODE_DIR/kubelet" \
  --cert-dir="$NODE_DIR/kubelet/pki" \
  --v=1

api_get() {
  curl -fsS --max-time 5 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
    --key "$DIR/pki/admin.key" "$API_URL$1"
}
node_ready() {
  [[ "$(api_get /api/v1/nodes/127.0.0.1 |
    jq -r '.status.conditions[]? | select(.type == "Ready") | .status')" == True ]]
}
node_start=$SECONDS
wait_for kubelet 120 node_ready
for c in kube-controller-manager kube-scheduler containerd; do
  kill -0 "$(cat "$DIR/pids/$c.pid")" 2>/dev/null || die "$c exited during startup"
done
# The controller-manager is working when it has made namespace default's account.
wait_for kube-controller-manager 60 api_get /api/v1/namespaces/default/serviceaccounts/default
log "node 127.0.0.1 Ready ($((SECONDS - node_start))s after the kubelet started)"
