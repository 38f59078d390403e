//! What a PKCS#11 failure means: for the request, the session, the module.

use cryptoki::error::{Error as CkError, RvError};

/// Any failure of the module, the token or the key. Never holds a PIN or key bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HsmError {
    pub message: String,
    /// The token or module may come back (removed, device error, logged out).
    pub transient: bool,
}

impl HsmError {
    pub(super) fn fatal(message: impl Into<String>) -> Self {
        HsmError {
            message: message.into(),
            transient: false,
        }
    }
    pub(super) fn transient(message: impl Into<String>) -> Self {
        HsmError {
            message: message.into(),
            transient: true,
        }
    }
}

/// What a PKCS#11 error means for the session and the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// This session is unusable; another may work (expired login, closed session).
    Session,
    /// The token or module is gone or broken; every session is lost.
    Device,
    /// The request itself failed; the session is fine.
    Request,
}

/// Classifies a PKCS#11 return value (pure).
pub fn classify(rv: RvError) -> Failure {
    match rv {
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::UserNotLoggedIn
        | RvError::KeyHandleInvalid
        | RvError::ObjectHandleInvalid
        | RvError::OperationActive => Failure::Session,
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SlotIdInvalid
        | RvError::GeneralError
        | RvError::CryptokiNotInitialized => Failure::Device,
        _ => Failure::Request,
    }
}

pub(super) fn ck(what: &str, e: CkError) -> (Failure, HsmError) {
    match e {
        CkError::Pkcs11(rv, _) => {
            let failure = classify(rv);
            let message = format!("PKCS#11 {what}: {rv:?}");
            let error = match failure {
                Failure::Request => HsmError::fatal(message),
                _ => HsmError::transient(message),
            };
            (failure, error)
        }
        other => (
            Failure::Request,
            HsmError::fatal(format!("PKCS#11 {what}: {other}")),
        ),
    }
}
