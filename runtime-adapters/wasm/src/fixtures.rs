//! The guest fixtures under `guests/fixtures/`, compiled into the crate so every test, the simulator and the
//! CLI's examples use the same bytes.

/// Ends at once with exit code 0.
pub const EXIT_CLEAN: &str = include_str!("../../../guests/fixtures/exit_clean.wat");
/// Calls `proc_exit(3)`.
pub const EXIT_CODE: &str = include_str!("../../../guests/fixtures/exit_code.wat");
/// Traps at once.
pub const TRAP: &str = include_str!("../../../guests/fixtures/trap.wat");
/// Spins forever without host calls.
pub const LOOP_FOREVER: &str = include_str!("../../../guests/fixtures/loop_forever.wat");
/// Sleeps 1 s at a time forever.
pub const SLEEPER: &str = include_str!("../../../guests/fixtures/sleeper.wat");
/// Grows memory until refused, then traps.
pub const MEMORY_HOG: &str = include_str!("../../../guests/fixtures/memory_hog.wat");
/// Exits 7 if its memory survived a restart, else traps (Property 1 probe).
pub const REMEMBER: &str = include_str!("../../../guests/fixtures/remember.wat");
/// Sets `greeting` in KV capability `kv` once a second; exits 1 when refused.
pub const KV_GREETER: &str = include_str!("../../../guests/fixtures/kv_greeter.wat");
/// Gets `greeting` from KV capability `kv` every 300 ms; exits 1 when refused.
pub const KV_READER: &str = include_str!("../../../guests/fixtures/kv_reader.wat");

/// Subscribes to `greetings.*` on capability `bus`; stores each message envelope under `last` in capability
/// `kv`; traps on a payload ending in `!`.
pub const SUBSCRIBER: &str = include_str!("../../../guests/fixtures/subscriber.wat");

/// Publishes "hello" on `greetings.hi` through capability `bus` every 200 ms, forever, whatever the answer.
pub const PUBLISHER: &str = include_str!("../../../guests/fixtures/publisher.wat");

/// Every 300 ms GETs, through capability `web`, `http://web/hello`, `http://web/away` (a redirect to
/// `intranet`) and `http://intranet/secret`, whatever the answers.
pub const HTTP_GETTER: &str = include_str!("../../../guests/fixtures/http_getter.wat");

/// Sleeps a random 0–4 s (seeded in simulation), then traps.
pub const RANDOM_TRAP: &str = include_str!("../../../guests/fixtures/random_trap.wat");

/// Tries fd 3 writes, a preopened directory and stdin; exits 9 if any reaches the OS, else 0 after 1 s.
pub const OS_PROBE: &str = include_str!("../../../guests/fixtures/os_probe.wat");

/// Every fixture by file stem.
pub const ALL: [(&str, &str); 14] = [
    ("exit_clean", EXIT_CLEAN),
    ("exit_code", EXIT_CODE),
    ("trap", TRAP),
    ("loop_forever", LOOP_FOREVER),
    ("sleeper", SLEEPER),
    ("memory_hog", MEMORY_HOG),
    ("remember", REMEMBER),
    ("kv_greeter", KV_GREETER),
    ("kv_reader", KV_READER),
    ("subscriber", SUBSCRIBER),
    ("publisher", PUBLISHER),
    ("http_getter", HTTP_GETTER),
    ("random_trap", RANDOM_TRAP),
    ("os_probe", OS_PROBE),
];

/// Module bytes of a fixture. Fixtures are checked in and parsed by the tests, so a parse failure is a bug
/// in this crate; it yields empty bytes, which every engine then rejects as an invalid module.
pub fn module(wat_source: &str) -> Vec<u8> {
    wat::parse_str(wat_source).unwrap_or_default()
}

/// Module bytes of the fixture named `name` (file stem), if there is one.
pub fn by_name(name: &str) -> Option<Vec<u8>> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, src)| module(src))
}

/// A host for guests that never call out (spin loops, engine and ABI tests): every capability call is answered
/// with nothing, sleeps end at once, clocks read 0, and output is dropped.
pub struct IdleHost;

impl crate::GuestHost for IdleHost {
    fn invoke(&self, _: String, _: String, _: Vec<u8>) -> futures::future::BoxFuture<'static, Vec<u8>> {
        Box::pin(async { Vec::new() })
    }
    fn sleep(&self, _: std::time::Duration) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn wall_nanos(&self) -> u64 {
        0
    }
    fn monotonic_nanos(&self) -> u64 {
        0
    }
    fn fill_random(&self, _: &mut [u8]) {}
    fn write_output(&self, _: u32, _: &[u8]) {}
}
