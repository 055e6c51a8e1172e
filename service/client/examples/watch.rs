//! Starts an instance on a running factum and prints the events it causes, until it has stopped. With
//! `cargo run --release -- up` in another terminal:
//!
//! ```text
//! cargo run -p factum-client --example watch            # or: --example watch -- HOST:PORT
//! ```

use factum_client::proto::events::EventKind;
use factum_client::proto::{InstanceStatus, Principal, StartRequest};
use factum_client::{Client, Credentials};
use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7700".into());
    // `factum up` listens on loopback in plaintext, where an identity is claimed; see `factum certs` for TLS.
    let client = Client::connect(addr, Credentials::claim(Principal::Operator("example".into()))).await?;
    // A guest that ends at once: starting, running, stopped.
    let module_bytes = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)?;
    let id = client.start(StartRequest { module_bytes, ..StartRequest::default() }).await?;
    println!("started {id}");
    let mut pages = std::pin::pin!(client.follow_events(0, true));
    while let Some(page) = pages.next().await {
        for event in page?.entries.into_iter().filter(|e| e.kind.instance_id() == Some(id.as_str())) {
            println!("#{} {}", event.seq, event.kind);
            if let EventKind::Instance { status: InstanceStatus::Stopped, .. } = event.kind {
                client.remove(&id).await?;
                println!("removed {id}");
                return Ok(());
            }
        }
    }
    Ok(())
}
