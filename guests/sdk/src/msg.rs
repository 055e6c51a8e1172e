//! Messaging: [`publish`] (`msg:publish:<pattern>`), [`subscribe`] (`msg:subscribe:<pattern>` covering the
//! topic), [`unsubscribe`]. Messages arrive through the handler named with [`on_message!`](crate::on_message),
//! called after `main` returns, one message at a time, for as long as the instance holds a subscription.

use serde::{Deserialize, Serialize};

use crate::{call, Error, ErrorCode, Result};

#[derive(Serialize)]
struct Publish<'a> {
    topic: &'a str,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

#[derive(Serialize)]
struct Topic<'a> {
    topic: &'a str,
}

/// A received message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// The capability the subscription was made through.
    pub capability_id: String,
    /// The topic it was published on.
    pub topic: String,
    /// Payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Publishes `payload` on the literal `topic`.
pub fn publish(capability: &str, topic: &str, payload: &[u8]) -> Result<()> {
    call(capability, "publish", &Publish { topic, payload })
}

/// Subscribes to `topic`, which may use `*` (one token) and a final `>` (the rest).
pub fn subscribe(capability: &str, topic: &str) -> Result<()> {
    call(capability, "subscribe", &Topic { topic })
}

/// Ends the subscription made with the same `topic`; whether there was one.
pub fn unsubscribe(capability: &str, topic: &str) -> Result<bool> {
    call(capability, "unsubscribe", &Topic { topic })
}

/// Reads the message the host is handing over and runs `handler` on it; the return code the host expects
/// (0 handled, 1 failed: a crash). Used by [`on_message!`](crate::on_message).
#[doc(hidden)]
pub fn dispatch(len: i32, handler: fn(Message) -> Result<()>) -> i32 {
    let message = crate::raw::read(len).and_then(|bytes| {
        rmp_serde::from_slice::<Message>(&bytes)
            .map_err(|e| Error::new(ErrorCode::InternalError, format!("unreadable message: {e}")))
    });
    match message.and_then(handler) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("message handler failed: {e}");
            1
        }
    }
}

/// Names the function that handles messages: `fn(Message) -> factum_sdk::Result<()>`. Returning an error
/// crashes the instance; the restart policy decides what follows, and the message is handed to the next run
/// (up to 3 attempts). Use it once, in the guest's main crate.
///
/// ```ignore
/// factum_sdk::on_message!(handle);
/// fn handle(message: factum_sdk::msg::Message) -> factum_sdk::Result<()> { Ok(()) }
/// ```
#[macro_export]
macro_rules! on_message {
    ($handler:path) => {
        #[no_mangle]
        pub extern "C" fn factum_on_message(len: i32) -> i32 {
            $crate::msg::dispatch(len, $handler)
        }
    };
}
