//! Writing an object we own: server-side apply with a field manager.
//!
//! One request whether the object exists or not, no resourceVersion to
//! carry and no create/replace/409 dance: the apiserver merges the fields
//! this manager sets into the object and leaves fields owned by others
//! alone. `force` takes the fields back from whoever changed them since
//! (someone editing the root by hand, a `kubectl apply`), which is what a
//! controller putting its object back wants.
//!
//! The body is the whole intent of this manager: a field it set before and
//! leaves out now is removed. k8s-openapi's types serialize `apiVersion`
//! and `kind`, which an apply body must have.

use std::fmt::Debug;

use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `meshca server`'s field manager (root ConfigMaps, ClusterTrustBundle).
pub const SERVER: &str = "meshca-server";
/// `meshca signer`'s field manager (the trust bundle Secret).
pub const SIGNER: &str = "meshca-signer";

/// Server-side applies `obj` (named by its `metadata.name`) as
/// `field_manager`, forcing conflicts; returns the object as stored.
pub async fn apply<K>(api: &Api<K>, field_manager: &str, obj: &K) -> kube::Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let Some(name) = obj.meta().name.as_deref().filter(|n| !n.is_empty()) else {
        return Err(kube::Error::Api(
            kube::core::Status::failure("an applied object needs metadata.name", "Invalid")
                .with_code(422)
                .boxed(),
        ));
    };
    api.patch(
        name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(obj),
    )
    .await
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn an_apply_body_carries_api_version_and_kind() {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("x".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = serde_json::to_value(&cm).unwrap();
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["kind"], "ConfigMap");
    }
}
