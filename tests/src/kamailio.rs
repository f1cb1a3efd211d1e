//! Kamailio (Debian package `kamailio`, 5.6.x) run as a PBX stand-in for interop tests.
//!
//! [`KamailioPbx::start`] writes the config template `tests/kamailio/pbx.cfg` (registrar +
//! usrloc in memory, RFC 3327 Path honoured, stateful relaying, record-routing of INVITEs) into
//! a fresh temp dir, starts `kamailio -DD -E` in its own process group on
//! `127.0.0.1:port` (UDP and TCP) and waits until it answers an OPTIONS over UDP.
//! Dropping the handle kills the whole process group and removes the temp dir.
//!
//! Path handling worth knowing when something registers through the SBC:
//! - the first Path URI MUST carry `;lr`, or Kamailio refuses the REGISTER (500);
//! - all Path header bodies of one REGISTER together must stay under 256 bytes;
//! - the 200 to a REGISTER echoes the Path only if the REGISTER has `Supported: path`
//!   ([`PathMode::Lazy`], the default); [`PathMode::Strict`] rejects a Path without it with 420;
//! - on lookup, the request goes to the first Path URI (transport taken from its
//!   `;transport=` parameter, UDP if none) with the whole Path inserted as Route headers,
//!   and the Request-URI set to the registered Contact; Kamailio also sends from the socket
//!   the REGISTER arrived on, so a Path added to a REGISTER sent over TCP should say
//!   `;transport=tcp` (not exercised by the tests yet);
//! - Kamailio inserts those Route headers between its own Via and the caller's Via, so the
//!   Via header lines of such a request are not contiguous: the SBC must collect every Via
//!   line, in order, wherever it sits;
//! - a `;received=<escaped uri>` parameter on the first Path URI overrides the next hop
//!   (`path_use_received=1`).

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The config template, with `@PORT@`, `@MPATH@` and `@PATH_MODE@` placeholders.
pub const PBX_CFG_TEMPLATE: &str = include_str!("../kamailio/pbx.cfg");

/// How long [`KamailioPbx::start`] waits for Kamailio to answer an OPTIONS.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Kamailio registrar `path_mode` (what the 200 to a REGISTER does with Path headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathMode {
    /// 0: store the Path, never echo it in the 200.
    Off,
    /// 1: store the Path, echo it in the 200 if the REGISTER has `Supported: path`.
    #[default]
    Lazy,
    /// 2: as `Lazy`, but reject a REGISTER carrying Path without `Supported: path` (420).
    Strict,
}

impl PathMode {
    fn as_param(self) -> u8 {
        match self {
            PathMode::Off => 0,
            PathMode::Lazy => 1,
            PathMode::Strict => 2,
        }
    }
}

/// A running Kamailio acting as a PBX on 127.0.0.1 (UDP and TCP on the same port).
pub struct KamailioPbx {
    child: Child,
    dir: PathBuf,
    log_path: PathBuf,
    addr: SocketAddr,
}

impl KamailioPbx {
    /// Starts Kamailio as a PBX on `127.0.0.1:port` (UDP and TCP), with Path mode
    /// [`PathMode::Lazy`], and waits (up to 10 s) until it answers an OPTIONS over UDP.
    pub fn start(port: u16) -> anyhow::Result<KamailioPbx> {
        Self::start_with(port, PathMode::default())
    }

    /// Like [`KamailioPbx::start`] with a chosen registrar `path_mode`.
    pub fn start_with(port: u16, path_mode: PathMode) -> anyhow::Result<KamailioPbx> {
        Self::start_template(port, PBX_CFG_TEMPLATE, path_mode)
    }

    /// Like [`KamailioPbx::start_with`] with another config template (same placeholders as
    /// [`PBX_CFG_TEMPLATE`], e.g. that template with an extra route block).
    pub fn start_template(
        port: u16,
        template: &str,
        path_mode: PathMode,
    ) -> anyhow::Result<KamailioPbx> {
        let binary = kamailio_binary()
            .ok_or_else(|| anyhow!("kamailio not found (scripts/install-deps.sh installs it)"))?;
        let mpath = module_dir()
            .ok_or_else(|| anyhow!("kamailio module directory (with registrar.so) not found"))?;

        let dir = make_temp_dir()?;
        let cfg_path = dir.join("pbx.cfg");
        let log_path = dir.join("kamailio.log");
        let mut mpath_str = mpath.to_string_lossy().into_owned();
        if !mpath_str.ends_with('/') {
            mpath_str.push('/');
        }
        let cfg = template
            .replace("@PORT@", &port.to_string())
            .replace("@MPATH@", &mpath_str)
            .replace("@PATH_MODE@", &path_mode.as_param().to_string());
        let setup = (|| -> anyhow::Result<(fs::File, fs::File)> {
            fs::write(&cfg_path, cfg).context("writing kamailio config")?;
            let log = fs::File::create(&log_path).context("creating kamailio log")?;
            let log2 = log.try_clone()?;
            Ok((log, log2))
        })();
        let (log_out, log_err) = match setup {
            Ok(files) => files,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };

        let spawned = Command::new(&binary)
            .arg("-f")
            .arg(&cfg_path)
            .args(["-DD", "-E"])
            .arg("-w")
            .arg(&dir)
            .arg("-Y")
            .arg(&dir)
            .args(["-m", "64", "-M", "8"])
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log_err)
            // Own process group, so Drop can signal Kamailio and all its children at once.
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(anyhow!(e).context(format!("spawning {}", binary.display())));
            }
        };

        let mut pbx = KamailioPbx {
            child,
            dir,
            log_path,
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        };
        if let Err(e) = pbx.wait_ready() {
            let log = pbx.log();
            // Drop kills the process group and removes the temp dir.
            drop(pbx);
            return Err(anyhow!("{e:#}\n--- kamailio log ---\n{log}"));
        }
        Ok(pbx)
    }

    /// Picks a free port with [`free_port`] and starts on it, retrying a few times with a
    /// new port if the start fails (the port may have been taken in between).
    pub fn start_any() -> anyhow::Result<KamailioPbx> {
        Self::start_any_with(PathMode::default())
    }

    /// [`KamailioPbx::start_any`] with a chosen registrar `path_mode`.
    pub fn start_any_with(path_mode: PathMode) -> anyhow::Result<KamailioPbx> {
        let mut last = None;
        for _ in 0..3 {
            let port = free_port()?;
            match Self::start_with(port, path_mode) {
                Ok(pbx) => return Ok(pbx),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("could not start kamailio")))
    }

    /// [`KamailioPbx::start_any_with`] with another config template (see
    /// [`KamailioPbx::start_template`]).
    pub fn start_any_template(template: &str, path_mode: PathMode) -> anyhow::Result<KamailioPbx> {
        let mut last = None;
        for _ in 0..3 {
            let port = free_port()?;
            match Self::start_template(port, template, path_mode) {
                Ok(pbx) => return Ok(pbx),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("could not start kamailio")))
    }

    /// Sends `sig` (a kill(1) name: `STOP`, `CONT`, `KILL`...) to Kamailio's whole process
    /// group (the main process and its workers), for failover drills: `STOP` freezes the
    /// PBX (its sockets stay open and silently queue what arrives), `CONT` thaws it.
    pub fn signal(&self, sig: &str) {
        signal_group(self.child.id(), sig);
    }

    /// Address Kamailio listens on (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Process id of the main Kamailio process (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything Kamailio wrote to stdout/stderr so far (for failure messages).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() {
                s = String::from_utf8_lossy(&buf).into_owned();
            }
        }
        s
    }

    /// Temp dir holding the generated config and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding probe socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let local = sock.local_addr()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut n = 0u32;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("kamailio exited during startup ({status})");
            }
            n += 1;
            let probe = format!(
                "OPTIONS sip:{addr} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bK-ready-{pid}-{n};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:probe@{local}>;tag=ready{n}\r\n\
                 To: <sip:{addr}>\r\n\
                 Call-ID: ready-{pid}-{n}@127.0.0.1\r\n\
                 CSeq: {n} OPTIONS\r\n\
                 Content-Length: 0\r\n\r\n",
                addr = self.addr,
                pid = std::process::id(),
            );
            // ECONNREFUSED may surface on send or recv while nothing listens yet.
            let _ = sock.send_to(probe.as_bytes(), self.addr);
            let until = Instant::now() + Duration::from_millis(200);
            while Instant::now() < until {
                match sock.recv_from(&mut buf) {
                    Ok((len, _)) => {
                        let text = String::from_utf8_lossy(&buf[..len]);
                        if text.starts_with("SIP/2.0 200") {
                            return Ok(());
                        }
                    }
                    Err(_) => break,
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "kamailio did not answer OPTIONS on {} within {:?}",
            self.addr,
            READY_TIMEOUT
        )
    }
}

impl Drop for KamailioPbx {
    fn drop(&mut self) {
        let pgid = self.child.id();
        // A frozen (SIGSTOP) Kamailio would not act on TERM.
        signal_group(pgid, "CONT");
        signal_group(pgid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        // Children (workers) of the main process may outlive it for a moment.
        signal_group(pgid, "KILL");
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Sends a signal to a whole process group via kill(1) (procps), ignoring errors.
fn signal_group(pgid: u32, sig: &str) {
    if pgid == 0 {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// True when a `kamailio` binary and its module directory (with registrar.so) exist.
pub fn kamailio_available() -> bool {
    kamailio_binary().is_some() && module_dir().is_some()
}

/// Finds the `kamailio` binary in `PATH`, then in the sbin directories (often not in a
/// non-root `PATH`).
fn kamailio_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join("kamailio"))
        .find(|p| p.is_file())
}

/// Finds Kamailio's module directory: Debian's multiarch `/usr/lib/<triplet>/kamailio/modules`
/// (found by scanning `/usr/lib/*`, not hardcoding the arch), then other usual places.
fn module_dir() -> Option<PathBuf> {
    let has_modules = |p: &Path| p.join("registrar.so").is_file() && p.join("tm.so").is_file();
    let mut candidates = Vec::new();
    for root in ["/usr/lib", "/usr/local/lib"] {
        if let Ok(entries) = fs::read_dir(root) {
            let mut subdirs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("kamailio").join("modules"))
                .collect();
            subdirs.sort();
            candidates.extend(subdirs);
        }
        candidates.push(Path::new(root).join("kamailio").join("modules"));
    }
    candidates.push(PathBuf::from("/usr/lib64/kamailio/modules"));
    candidates.push(PathBuf::from("/usr/local/lib64/kamailio/modules"));
    candidates.into_iter().find(|p| has_modules(p))
}

/// Creates a fresh, unique temp dir for one Kamailio instance.
fn make_temp_dir() -> anyhow::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "sbc-kamailio-{}-{}-{:08x}",
            std::process::id(),
            n,
            nanos
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(anyhow!(e).context(format!("creating {}", dir.display()))),
        }
    }
    bail!("could not create a temp dir for kamailio")
}

/// A port on 127.0.0.1 that is free for both UDP and TCP at the time of the call.
///
/// The sockets are released before returning, so another process may grab the port before
/// Kamailio binds it (a small race); [`KamailioPbx::start_any`] retries with a new port.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding UDP port 0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1")
}
