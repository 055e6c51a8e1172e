//! A listener's accept errors never stop the server: one connection's error is skipped, any other is retried.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use factum_env::{rpc, BoxStream, Env, Listener};
use futures::future::BoxFuture;

/// Answers accepts from a script, then waits forever.
struct Scripted(Mutex<VecDeque<io::Result<(BoxStream, String)>>>);

impl Listener for Scripted {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        let next = self.0.lock().unwrap().pop_front();
        Box::pin(async move {
            match next {
                Some(result) => result,
                None => futures::future::pending().await,
            }
        })
    }
    fn local_addr(&self) -> io::Result<String> {
        Ok("scripted:0".into())
    }
}

fn connection() -> io::Result<(BoxStream, String)> {
    let (near, _far) = tokio::io::duplex(64);
    Ok((Box::pin(near), "peer".into()))
}

#[tokio::test(start_paused = true)]
async fn accept_errors_do_not_stop_the_server() {
    let script = VecDeque::from([
        connection(),
        Err(io::Error::from(io::ErrorKind::ConnectionReset)),
        Err(io::Error::other("too many open files")), // EMFILE and the like: retried after a pause
        connection(),
    ]);
    let accepted = Arc::new(Mutex::new(0));
    let counter = accepted.clone();
    let env = Env::tokio();
    let server = tokio::spawn(async move {
        let connections = rpc::Connections::new(rpc::ServerLimits::default());
        let scripted = Box::new(Scripted(Mutex::new(script)));
        rpc::accept_loop(&env, scripted, "test", &connections, move |_, _, _| *counter.lock().unwrap() += 1).await;
    });
    tokio::time::sleep(rpc::ACCEPT_RETRY / 2).await;
    assert_eq!(*accepted.lock().unwrap(), 1, "the second connection waits out the pause");
    tokio::time::sleep(rpc::ACCEPT_RETRY).await;
    assert_eq!(*accepted.lock().unwrap(), 2, "accepting again after the pause");
    assert!(!server.is_finished(), "the loop never ends on its own");
    server.abort();
}
