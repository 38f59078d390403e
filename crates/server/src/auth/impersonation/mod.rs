//! ztunnel impersonation (Istio's node authorizer): a node agent asks for a
//! certificate of a workload on its node with metadata `ImpersonatedIdentity`.
//!
//! Allowed only when the caller proved itself with a Kubernetes token
//! (TokenReview, not a client certificate nor a local JWT) as an account in
//! `CA_TRUSTED_NODE_ACCOUNTS`, the requested identity is a SPIFFE workload ID
//! of this trust domain, the caller's pod (from the bound token's claims)
//! exists with that UID under the caller's account, and some pod on the
//! caller's node runs under the requested account. Pods come from one watch
//! on all pods into an index by name and by node ([`PodIndex`]), never from
//! an API call per request nor a scan of all pods ([`pods`]). The same watch
//! tells the token cache which pods are gone ([`crate::auth::PodDeletions`]).

mod pods;

use std::str::FromStr;

use meshca_pki::SpiffeId;

use crate::auth::Caller;
pub use pods::{PodIndex, PodStore, WatchedPod};

/// Istio's message for every refusal.
pub const REFUSAL_MESSAGE: &str = "request impersonation authentication failure";

/// An entry of `CA_TRUSTED_NODE_ACCOUNTS`: `<namespace>/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedAccount {
    pub namespace: String,
    pub service_account: String,
}

impl FromStr for TrustedAccount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok(TrustedAccount {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                })
            }
            _ => Err(format!(
                "trusted node account {s:?}: expected <namespace>/<service account>"
            )),
        }
    }
}

/// Parses a comma separated `CA_TRUSTED_NODE_ACCOUNTS` value list; empty
/// entries are skipped (an empty list turns impersonation off).
pub fn parse_trusted_accounts(entries: &[String]) -> Result<Vec<TrustedAccount>, String> {
    entries
        .iter()
        .flat_map(|e| e.split(','))
        .filter(|e| !e.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// What the decision needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: Option<String>,
    pub service_account: String,
    pub node: Option<String>,
}

/// The pods the decision may look at.
pub trait Pods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether some pod on `node` runs as `namespace/service_account`.
    fn any_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// Why impersonation was refused: a stable reason (the `meshca-reason`
/// header) and a detail for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

fn refusal(reason: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        detail: detail.into(),
    }
}

/// The identity to certify for `caller` impersonating `requested`, or why not.
/// `trusted` empty means impersonation is off.
pub fn decide(
    trusted: &[TrustedAccount],
    trust_domain: &str,
    caller: &Caller,
    requested: &str,
    pods: &impl Pods,
) -> Result<String, Refusal> {
    let Some(account) = caller
        .kube
        .as_ref()
        .filter(|_| caller.authenticator == "token_review")
    else {
        return Err(refusal(
            "impersonation_not_allowed",
            format!(
                "caller authenticated by {}, impersonation needs a Kubernetes token",
                caller.authenticator
            ),
        ));
    };
    if !trusted
        .iter()
        .any(|t| t.namespace == account.namespace && t.service_account == account.service_account)
    {
        return Err(refusal(
            "impersonation_not_allowed",
            format!(
                "{}/{} is not a trusted node account",
                account.namespace, account.service_account
            ),
        ));
    }
    let id =
        SpiffeId::from_str(requested).map_err(|e| refusal("impersonation_invalid_identity", e))?;
    if id.trust_domain() != trust_domain {
        return Err(refusal(
            "impersonation_invalid_identity",
            format!(
                "requested trust domain {:?} is not {trust_domain:?}",
                id.trust_domain()
            ),
        ));
    }
    let Some((want_ns, want_sa)) = id.namespace_and_service_account() else {
        return Err(refusal(
            "impersonation_invalid_identity",
            format!("{requested:?} is not a workload identity /ns/<ns>/sa/<sa>"),
        ));
    };
    let (Some(pod_name), Some(pod_uid)) = (&account.pod_name, &account.pod_uid) else {
        return Err(refusal(
            "impersonation_pod_mismatch",
            "the caller's token is not bound to a pod",
        ));
    };
    let Some(pod) = pods.pod(&account.namespace, pod_name) else {
        return Err(refusal(
            "impersonation_pod_mismatch",
            format!("caller pod {}/{pod_name} not found", account.namespace),
        ));
    };
    if pod.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(refusal(
            "impersonation_pod_mismatch",
            format!("caller pod {}/{pod_name}: UID differs", account.namespace),
        ));
    }
    if pod.service_account != account.service_account {
        return Err(refusal(
            "impersonation_pod_mismatch",
            format!(
                "caller pod {}/{pod_name} runs as {}, not {}",
                account.namespace, pod.service_account, account.service_account
            ),
        ));
    }
    let Some(node) = pod.node.as_deref().filter(|n| !n.is_empty()) else {
        return Err(refusal(
            "impersonation_pod_mismatch",
            format!("caller pod {}/{pod_name} is on no node", account.namespace),
        ));
    };
    if !pods.any_on_node(node, want_ns, want_sa) {
        return Err(refusal(
            "impersonation_no_pod_on_node",
            format!("no pod of {want_ns}/{want_sa} on node {node}"),
        ));
    }
    Ok(id.to_string())
}

/// Impersonation as configured: off without trusted accounts or pods.
pub struct Impersonation {
    pub trusted: Vec<TrustedAccount>,
    pub pods: PodStore,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KubeAccount;

    #[derive(Default)]
    struct FakePods(Vec<(String, String, PodFacts)>);

    impl FakePods {
        fn with(mut self, ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> Self {
            self.0.push((
                ns.into(),
                name.into(),
                PodFacts {
                    uid: Some(uid.into()),
                    service_account: sa.into(),
                    node: Some(node.into()),
                },
            ));
            self
        }
    }

    impl Pods for FakePods {
        fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
            self.0
                .iter()
                .find(|(n, p, _)| n == namespace && p == name)
                .map(|(_, _, f)| f.clone())
        }
        fn any_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
            self.0.iter().any(|(n, _, f)| {
                n == namespace
                    && f.service_account == service_account
                    && f.node.as_deref() == Some(node)
            })
        }
    }

    fn ztunnel(pod: Option<(&str, &str)>) -> Caller {
        Caller {
            identities: vec!["spiffe://cluster.local/ns/istio-system/sa/ztunnel".into()],
            authenticator: "token_review",
            kube: Some(KubeAccount {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into(),
                pod_name: pod.map(|p| p.0.into()),
                pod_uid: pod.map(|p| p.1.into()),
            }),
        }
    }

    fn trusted() -> Vec<TrustedAccount> {
        parse_trusted_accounts(&["istio-system/ztunnel".into()]).unwrap()
    }

    fn cluster() -> FakePods {
        FakePods::default()
            .with("istio-system", "zt-a", "uid-a", "ztunnel", "node-a")
            .with("istio-system", "zt-b", "uid-b", "ztunnel", "node-b")
            .with("shop", "web-1", "uid-w", "web", "node-a")
            .with("shop", "db-1", "uid-d", "db", "node-b")
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn reason(r: Result<String, Refusal>) -> &'static str {
        r.unwrap_err().reason
    }

    #[test]
    fn trusted_node_agent_gets_a_workload_on_its_node() {
        let got = decide(
            &trusted(),
            "cluster.local",
            &ztunnel(Some(("zt-a", "uid-a"))),
            WEB,
            &cluster(),
        );
        assert_eq!(got.unwrap(), WEB);
    }

    #[test]
    fn workloads_on_other_nodes_are_refused() {
        let caller = ztunnel(Some(("zt-a", "uid-a")));
        let db = "spiffe://cluster.local/ns/shop/sa/db";
        let r = decide(&trusted(), "cluster.local", &caller, db, &cluster());
        assert_eq!(reason(r), "impersonation_no_pod_on_node");
        let caller = ztunnel(Some(("zt-b", "uid-b")));
        assert!(decide(&trusted(), "cluster.local", &caller, db, &cluster()).is_ok());
    }

    #[test]
    fn only_trusted_kubernetes_accounts_may_impersonate() {
        let pods = cluster();
        let mut caller = ztunnel(Some(("zt-a", "uid-a")));
        assert_eq!(
            reason(decide(&[], "cluster.local", &caller, WEB, &pods)),
            "impersonation_not_allowed"
        );
        caller.kube.as_mut().unwrap().service_account = "other".into();
        assert_eq!(
            reason(decide(&trusted(), "cluster.local", &caller, WEB, &pods)),
            "impersonation_not_allowed"
        );
        for authenticator in ["client_cert", "jwt"] {
            let mut caller = ztunnel(Some(("zt-a", "uid-a")));
            caller.authenticator = authenticator;
            if authenticator == "client_cert" {
                caller.kube = None;
            }
            assert_eq!(
                reason(decide(&trusted(), "cluster.local", &caller, WEB, &pods)),
                "impersonation_not_allowed",
                "{authenticator}"
            );
        }
    }

    #[test]
    fn the_requested_identity_must_be_a_workload_of_this_trust_domain() {
        let caller = ztunnel(Some(("zt-a", "uid-a")));
        for requested in [
            "web",
            "",
            "spiffe://other.domain/ns/shop/sa/web",
            "spiffe://cluster.local/something/else",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "https://cluster.local/ns/shop/sa/web",
        ] {
            assert_eq!(
                reason(decide(
                    &trusted(),
                    "cluster.local",
                    &caller,
                    requested,
                    &cluster()
                )),
                "impersonation_invalid_identity",
                "{requested}"
            );
        }
    }

    #[test]
    fn the_callers_pod_must_exist_with_its_uid_and_account() {
        let pods = cluster().with("istio-system", "impostor", "uid-i", "default", "node-a");
        for (pod, why) in [
            (None, "token not bound to a pod"),
            (Some(("gone", "uid-x")), "missing pod"),
            (Some(("zt-a", "uid-old")), "recreated pod"),
            (Some(("impostor", "uid-i")), "pod of another account"),
        ] {
            let caller = ztunnel(pod);
            assert_eq!(
                reason(decide(&trusted(), "cluster.local", &caller, WEB, &pods)),
                "impersonation_pod_mismatch",
                "{why}"
            );
        }
    }

    #[test]
    fn trusted_accounts_parse_from_the_environment_form() {
        let parsed =
            parse_trusted_accounts(&["istio-system/ztunnel, kube-system/node-agent".into()])
                .unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].service_account, "node-agent");
        assert!(parse_trusted_accounts(&["".into()]).unwrap().is_empty());
        assert!(parse_trusted_accounts(&["ztunnel".into()]).is_err());
        assert!(parse_trusted_accounts(&["a/b/c".into()]).is_err());
    }
}
