//! The CSR objects, their outcome, and the waiters.

use crate::backend::ra::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use meshca_pki::GrpcCode;

#[test]
fn the_kubernetes_csr_is_shaped_like_istiods() {
    let csr = new_csr(b"PEM", "example.com/foo", 3600);
    assert_eq!(csr.metadata.generate_name.as_deref(), Some("csr-workload-"));
    assert_eq!(csr.metadata.name, None);
    assert_eq!(csr.spec.request.0, b"PEM");
    assert_eq!(csr.spec.signer_name, "example.com/foo");
    assert_eq!(csr.spec.expiration_seconds, Some(3600));
    assert_eq!(
        csr.spec.usages.as_deref().unwrap(),
        [
            "digital signature",
            "key encipherment",
            "server auth",
            "client auth"
        ]
    );
    let json = serde_json::to_value(&csr).unwrap();
    assert_eq!(json["apiVersion"], "certificates.k8s.io/v1");
}

#[test]
fn approval_adds_one_approved_condition() {
    let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
    approve(&mut csr);
    approve(&mut csr);
    let conditions = csr.status.unwrap().conditions.unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].type_, "Approved");
    assert_eq!(conditions[0].status, "True");
    assert_eq!(conditions[0].reason.as_deref(), Some(APPROVAL_REASON));
}

#[test]
fn denied_and_failed_are_final_and_beat_a_certificate() {
    let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
    assert_eq!(progress(&csr), Progress::Pending);
    approve(&mut csr);
    assert_eq!(progress(&csr), Progress::Pending);
    csr.status.as_mut().unwrap().certificate = Some(ByteString(b"CERT".to_vec()));
    assert_eq!(progress(&csr), Progress::Issued(b"CERT".to_vec()));
    for type_ in ["Denied", "Failed"] {
        let mut c = csr.clone();
        c.status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
            .push(CertificateSigningRequestCondition {
                type_: type_.into(),
                status: "True".into(),
                reason: Some("SignerValidationFailure".into()),
                message: Some("policy_trust_domain: nope".into()),
                ..Default::default()
            });
        let (reason, message) = (
            "SignerValidationFailure".into(),
            "policy_trust_domain: nope".into(),
        );
        let expected = if type_ == "Denied" {
            Progress::Denied { reason, message }
        } else {
            Progress::Failed { reason, message }
        };
        assert_eq!(progress(&c), expected);
        let e = final_outcome(&c).unwrap_err();
        assert!(e.to_string().contains("policy_trust_domain: nope"), "{e}");
        assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);
    }
}

/// A CSR object `name` with `uid`, issued with `cert`.
fn issued_object(name: &str, uid: &str, cert: &[u8]) -> CertificateSigningRequest {
    let mut csr = new_csr(b"PEM", "example.com/foo", 3600);
    csr.metadata.name = Some(name.into());
    csr.metadata.uid = Some(uid.into());
    approve(&mut csr);
    csr.status.as_mut().unwrap().certificate = Some(ByteString(cert.to_vec()));
    csr
}

#[tokio::test]
async fn a_waiter_takes_its_answer_only_from_the_object_with_its_uid() {
    let waiters = Arc::new(Waiters::default());
    // A namesake's certificate (ours deleted, the name reused) is never
    // our answer: the wait ends with Replaced.
    let (_registered, answer) = waiters.register("csr-workload-a", "uid-ours");
    waiters.seen(&issued_object("csr-workload-a", "uid-impostor", b"THEIRS"));
    let e = answer.await.unwrap().unwrap_err();
    assert_eq!(e, RaError::Replaced("csr-workload-a".into()));
    assert_eq!(e.reason(), "ra_csr_replaced");
    assert_eq!(e.kind().grpc_code(), GrpcCode::Internal);

    let (_registered, answer) = waiters.register("csr-workload-b", "uid-ours");
    waiters.deleted(&issued_object("csr-workload-b", "uid-impostor", b"THEIRS"));
    assert_eq!(
        answer.await.unwrap().unwrap_err(),
        RaError::Replaced("csr-workload-b".into())
    );

    let (_registered, answer) = waiters.register("csr-workload-c", "uid-ours");
    waiters.seen(&issued_object("csr-workload-c", "uid-ours", b"OURS"));
    assert_eq!(answer.await.unwrap().unwrap(), b"OURS");

    let (_registered, answer) = waiters.register("csr-workload-d", "uid-ours");
    waiters.deleted(&issued_object("csr-workload-d", "uid-ours", b""));
    assert_eq!(answer.await.unwrap().unwrap_err(), RaError::Deleted);
}
