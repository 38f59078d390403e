//! One file per command, each with its arguments; [`common`] holds the
//! argument groups that `server` and `signer` share.

pub mod ca;
pub mod common;
pub mod inspect;
pub mod loadgen;
pub mod request;
pub mod server;
pub mod signer;
pub mod token;
pub mod verify;
