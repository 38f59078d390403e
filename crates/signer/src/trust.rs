//! Trust bundle publication: keep a Secret (istiod's `external-ca-cert`,
//! key `root-cert.pem`) equal to the signers' roots. Automates the seed's
//! manual `kubectl create secret generic external-ca-cert ...` step.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};

use meshca_ca_store::CurrentCa;

/// Where the roots go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundleTarget {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl Default for TrustBundleTarget {
    fn default() -> Self {
        TrustBundleTarget {
            namespace: "istio-system".into(),
            name: "external-ca-cert".into(),
            key: "root-cert.pem".into(),
        }
    }
}

/// The roots of all signers, each once, in signer order (PEM); `None`
/// until every signer has a CA (never a partial bundle).
pub fn roots_pem(cas: &[CurrentCa]) -> Option<String> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut out = String::new();
    for current in cas {
        let ca = current.borrow().clone()?;
        for der in ca.roots_der() {
            if !seen.contains(der) {
                out.push_str(&meshca_pki::pem::encode("CERTIFICATE", der));
                seen.push(der.clone());
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Makes the Secret hold exactly `pem` under the key; returns whether it
/// wrote. Updates carry the resourceVersion read.
pub async fn sync_once(client: &Client, target: &TrustBundleTarget, pem: &str) -> Result<bool> {
    let api = Api::<Secret>::namespaced(client.clone(), &target.namespace);
    let want = ByteString(pem.as_bytes().to_vec());
    match api
        .get_opt(&target.name)
        .await
        .with_context(|| format!("reading Secret {}/{}", target.namespace, target.name))?
    {
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(target.name.clone()),
                    namespace: Some(target.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "meshca-signer".to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(target.key.clone(), want)])),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &secret)
                .await
                .with_context(|| format!("creating Secret {}/{}", target.namespace, target.name))?;
            Ok(true)
        }
        Some(mut secret) => {
            let data = secret.data.get_or_insert_with(BTreeMap::new);
            if data.get(&target.key) == Some(&want) {
                return Ok(false);
            }
            data.insert(target.key.clone(), want);
            api.replace(&target.name, &PostParams::default(), &secret)
                .await
                .with_context(|| format!("updating Secret {}/{}", target.namespace, target.name))?;
            Ok(true)
        }
    }
}

/// Publishes on every CA change and re-checks every `resync`.
pub async fn keep_published(
    client: Client,
    target: TrustBundleTarget,
    cas: Vec<CurrentCa>,
    resync: Duration,
) {
    let mut changes = futures::stream::select_all(
        cas.iter()
            .map(|ca| Box::pin(meshca_ca_store::changes(ca)) as std::pin::Pin<Box<_>>),
    );
    loop {
        if let Some(pem) = roots_pem(&cas) {
            match sync_once(&client, &target, &pem).await {
                Ok(true) => {
                    tracing::info!(namespace = %target.namespace, name = %target.name, "trust bundle published")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "publishing the trust bundle"),
            }
        }
        tokio::select! {
            _ = changes.next() => {}
            _ = tokio::time::sleep(resync) => {}
        }
    }
}
