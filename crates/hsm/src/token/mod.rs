//! A CA key inside a PKCS#11 token: module, session pool, signing, recovery.
//!
//! ```text
//! sign(message) ─> take an idle session (or open one: slot by token label,
//!                  login, find the key) ─> C_Sign ─> give the session back
//!       error ─> session-level (handle invalid, logged out): drop the session, retry once
//!             ─> device-level (removed, CKR_DEVICE_ERROR): drop every session;
//!                the next request re-initialises the module (at most once a
//!                second) so a reinserted or restored token is found again
//! ```
//!
//! Sessions are opened "no drop": a session from before a re-initialisation
//! is forgotten, never closed, so it cannot close a new session that reused
//! its handle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use meshca_pki::key::{ExternalAlgorithm, ExternalSigner, SignError, ecdsa_raw_to_der};

use crate::pin::{Pin, PinSource};
use crate::uri::Pkcs11Uri;

mod error;
mod generate;
mod objects;

use error::ck;
pub use error::{Failure, HsmError, classify};
pub use generate::generate;
#[cfg(test)]
use objects::ec_point;
use objects::{curve_params, find_one, read_public};

/// One loaded module, shared by every key that uses it (PKCS#11 allows one
/// initialisation per process).
pub struct Module {
    path: PathBuf,
    /// Held shared by every call into the module, exclusively by
    /// finalisation: C_Finalize never runs under another thread's C_Sign.
    busy: RwLock<()>,
    state: Mutex<ModuleState>,
}

struct ModuleState {
    ctx: Option<Pkcs11>,
    generation: u64,
    last_reset: Option<Instant>,
}

/// How often a lost token makes the module re-initialise at most.
const RESET_INTERVAL: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Module {
    /// The module at `path`, loaded once per process.
    pub fn get(path: &Path) -> Arc<Module> {
        static MODULES: Mutex<Option<HashMap<PathBuf, Arc<Module>>>> = Mutex::new(None);
        let mut modules = lock(&MODULES);
        modules
            .get_or_insert_with(HashMap::new)
            .entry(path.to_owned())
            .or_insert_with(|| {
                Arc::new(Module {
                    path: path.to_owned(),
                    busy: RwLock::new(()),
                    state: Mutex::new(ModuleState {
                        ctx: None,
                        generation: 0,
                        last_reset: None,
                    }),
                })
            })
            .clone()
    }

    /// The initialised context and its generation.
    fn context(&self) -> Result<(Pkcs11, u64), HsmError> {
        let mut state = lock(&self.state);
        if let Some(ctx) = &state.ctx {
            return Ok((ctx.clone(), state.generation));
        }
        let ctx = Pkcs11::new(&self.path).map_err(|e| {
            HsmError::fatal(format!(
                "loading PKCS#11 module {}: {e}",
                self.path.display()
            ))
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(HsmError::transient(format!(
                    "initialising PKCS#11 module {}: {e}",
                    self.path.display()
                )));
            }
        }
        state.ctx = Some(ctx.clone());
        Ok((ctx, state.generation))
    }

    /// Finalises the module (if still at `generation`) so that the next
    /// use initialises it again and sees tokens as they are now.
    fn reset(&self, generation: u64) {
        let _exclusive = self.busy.write().unwrap_or_else(|e| e.into_inner());
        let mut state = lock(&self.state);
        if state.generation != generation {
            return;
        }
        if state
            .last_reset
            .is_some_and(|t| t.elapsed() < RESET_INTERVAL)
        {
            return;
        }
        if let Some(ctx) = state.ctx.take() {
            let _ = ctx.finalize();
        }
        state.generation += 1;
        state.last_reset = Some(Instant::now());
        tracing::info!(module = %self.path.display(), "PKCS#11 module finalised; it is initialised again on the next request");
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Held while calling into the module (see `busy`).
    fn enter(&self) -> RwLockReadGuard<'_, ()> {
        self.busy.read().unwrap_or_else(|e| e.into_inner())
    }

    fn generation(&self) -> u64 {
        lock(&self.state).generation
    }
}

fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, (Failure, HsmError)> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| ck("C_GetSlotList", e))?;
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label_ok = uri.token.as_deref().is_none_or(|t| info.label() == t);
        let serial_ok = uri
            .serial
            .as_deref()
            .is_none_or(|s| info.serial_number() == s);
        if label_ok && serial_ok {
            return Ok(slot);
        }
    }
    Err((
        Failure::Device,
        HsmError::transient(format!("no token matching {uri} is present")),
    ))
}

fn login(session: &Session, pin: &Pin) -> Result<(), (Failure, HsmError)> {
    let auth = AuthPin::from(pin.0.as_str());
    match session.login(UserType::User, Some(&auth)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid, _)) => Err((
            Failure::Request,
            HsmError::fatal("PKCS#11 login: the PIN is incorrect"),
        )),
        Err(e) => Err(ck("C_Login", e)),
    }
}

struct Pooled {
    session: Session,
    key: ObjectHandle,
    generation: u64,
}

/// A CA private key in a token; signs through a pool of sessions.
pub struct TokenKey {
    module: Arc<Module>,
    uri: Pkcs11Uri,
    pin: PinSource,
    algorithm: ExternalAlgorithm,
    public_key: Vec<u8>,
    idle: Mutex<Vec<Pooled>>,
    max_idle: usize,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.uri.to_string())
            .field("module", &self.module.path)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Most idle sessions kept per key: more requests in parallel open more
/// sessions, and the surplus is closed when they finish.
pub const DEFAULT_MAX_IDLE_SESSIONS: usize = 64;

impl TokenKey {
    /// Opens the key named by `uri` in `module`, reading its public key.
    pub fn open(module: Arc<Module>, uri: Pkcs11Uri, pin: PinSource) -> Result<Self, HsmError> {
        let mut key = TokenKey {
            module,
            uri,
            pin,
            algorithm: ExternalAlgorithm::EcdsaP256,
            public_key: Vec::new(),
            idle: Mutex::new(Vec::new()),
            max_idle: DEFAULT_MAX_IDLE_SESSIONS,
        };
        let generation = key.module.generation();
        let opened = {
            let _busy = key.module.enter();
            key.open_session().and_then(|pooled| {
                let public = read_public(&pooled.session, &key.uri, pooled.key)?;
                Ok((pooled, public))
            })
        };
        match opened {
            Ok((pooled, (algorithm, public_key))) => {
                key.algorithm = algorithm;
                key.public_key = public_key;
                key.give_back(pooled);
                Ok(key)
            }
            Err((failure, e)) => {
                if failure == Failure::Device {
                    // The next attempt sees the module's tokens as they are then.
                    key.module.reset(generation);
                }
                Err(e)
            }
        }
    }

    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    fn open_session(&self) -> Result<Pooled, (Failure, HsmError)> {
        let (ctx, generation) = self.module.context().map_err(|e| (Failure::Device, e))?;
        let attempt = || -> Result<Pooled, (Failure, HsmError)> {
            let slot = find_slot(&ctx, &self.uri)?;
            let session = ctx
                .open_ro_session_no_drop(slot)
                .map_err(|e| ck("C_OpenSession", e))?;
            let pin = self
                .pin
                .read()
                .map_err(|e| (Failure::Request, HsmError::fatal(e)))?;
            let found = login(&session, &pin)
                .and_then(|()| find_one(&session, &self.uri, ObjectClass::PRIVATE_KEY));
            match found {
                Ok(Some(key)) => Ok(Pooled {
                    session,
                    key,
                    generation,
                }),
                Ok(None) => {
                    let _ = session.close();
                    Err((
                        Failure::Device,
                        HsmError::transient(format!("no private key {} in the token", self.uri)),
                    ))
                }
                Err(e) => {
                    let _ = session.close();
                    Err(e)
                }
            }
        };
        attempt()
    }

    fn take(&self) -> Result<Pooled, (Failure, HsmError)> {
        loop {
            let popped = lock(&self.idle).pop();
            match popped {
                Some(p) if p.generation == self.current_generation() => return Ok(p),
                // From before a re-initialisation: its handle is meaningless now.
                Some(_) => continue,
                None => return self.open_session(),
            }
        }
    }

    fn current_generation(&self) -> u64 {
        self.module.generation()
    }

    fn give_back(&self, pooled: Pooled) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(pooled);
        } else {
            drop(idle);
            let _ = pooled.session.close();
        }
    }

    /// Forgets every idle session (without closing: their handles may be reused).
    fn lose_sessions(&self) {
        lock(&self.idle).clear();
    }

    fn sign_once(&self, message: &[u8]) -> Result<Vec<u8>, (Failure, HsmError)> {
        let pooled = self.take()?;
        let result = match self.algorithm {
            ExternalAlgorithm::Rsa { .. } => {
                pooled
                    .session
                    .sign(&Mechanism::Sha256RsaPkcs, pooled.key, message)
            }
            ExternalAlgorithm::EcdsaP256 | ExternalAlgorithm::EcdsaP384 => {
                let hash = if self.algorithm == ExternalAlgorithm::EcdsaP256 {
                    &digest::SHA256
                } else {
                    &digest::SHA384
                };
                let digest = digest::digest(hash, message);
                pooled
                    .session
                    .sign(&Mechanism::Ecdsa, pooled.key, digest.as_ref())
            }
        };
        match result {
            Ok(signature) => {
                self.give_back(pooled);
                match self.algorithm {
                    ExternalAlgorithm::Rsa { .. } => Ok(signature),
                    _ => ecdsa_raw_to_der(&signature).ok_or_else(|| {
                        (
                            Failure::Request,
                            HsmError::fatal("the token returned a malformed ECDSA signature"),
                        )
                    }),
                }
            }
            Err(e) => {
                let (failure, error) = ck("C_Sign", e);
                match failure {
                    Failure::Request => self.give_back(pooled),
                    Failure::Session => drop(pooled),
                    Failure::Device => drop(pooled),
                }
                Err((failure, error))
            }
        }
    }

    /// Signs, retrying once on a fresh session when this one was lost
    /// (an expired login, a closed session).
    pub fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut retried = false;
        loop {
            let generation = self.module.generation();
            let result = {
                let _busy = self.module.enter();
                self.sign_once(message)
            };
            match result {
                Ok(signature) => return Ok(signature),
                Err((Failure::Session, _)) if !retried => retried = true,
                Err((Failure::Device, e)) => {
                    self.lose_sessions();
                    self.module.reset(generation);
                    return Err(e);
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    /// Idle sessions now (for tests and metrics).
    pub fn idle_sessions(&self) -> usize {
        lock(&self.idle).len()
    }
}

impl ExternalSigner for TokenKey {
    fn algorithm(&self) -> ExternalAlgorithm {
        self.algorithm
    }
    fn public_key_bits(&self) -> &[u8] {
        &self.public_key
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        self.sign_message(message).map_err(|e| {
            let uri = self.uri.to_string();
            if e.message.contains(&uri) {
                SignError::KeyUnavailable(e.message)
            } else {
                SignError::KeyUnavailable(format!("{uri}: {}", e.message))
            }
        })
    }
    fn location(&self) -> String {
        self.uri.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_tokens_and_device_errors_are_device_failures() {
        for rv in [
            RvError::DeviceError,
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SlotIdInvalid,
        ] {
            assert_eq!(classify(rv), Failure::Device, "{rv:?}");
        }
        for rv in [RvError::UserNotLoggedIn, RvError::SessionHandleInvalid] {
            assert_eq!(classify(rv), Failure::Session, "{rv:?}");
        }
        assert_eq!(classify(RvError::DataLenRange), Failure::Request);
    }

    #[test]
    fn ec_points_are_unwrapped_from_their_octet_string() {
        let mut bare = vec![4u8; 65];
        bare[1] = 63;
        assert_eq!(ec_point(&bare).unwrap(), bare);
        let mut wrapped = vec![4u8, 65];
        wrapped.extend(&bare);
        assert_eq!(ec_point(&wrapped).unwrap(), bare);
        let mut long = vec![4u8, 0x81, 97];
        long.extend(vec![4u8; 97]);
        assert_eq!(ec_point(&long).unwrap(), vec![4u8; 97]);
        assert_eq!(ec_point(&[4, 9, 4, 1, 2]), None);
        assert_eq!(ec_point(&[0x30, 0]), None);
    }
}
