//! Processes a test starts (testenv binaries, meshca itself): [`Proc`] kills
//! them when the test ends, [`free_port`] finds them a loopback port.

/// A child process killed (and reaped) when dropped, so that a failed
/// assertion leaves nothing running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}
