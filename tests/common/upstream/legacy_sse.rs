//! The legacy HTTP+SSE transport (protocol 2024-11-05) on the server side, which rmcp 3 no
//! longer ships: `GET /sse` opens a session and streams an `endpoint` event, then every server
//! message as a `message` event; `POST /message?sessionId=…` takes one JSON-RPC message.
//! Each session runs the same rmcp [`TestServer`] as Streamable HTTP, over channels.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Query, Request, State as AxumState},
    http::StatusCode,
    response::sse::{Event, Sse},
};
use futures::{Stream, StreamExt};
use rmcp::{
    model::{ClientJsonRpcMessage, GetExtensions, JsonRpcMessage, ServerJsonRpcMessage},
    transport::Transport,
    RoleServer, ServiceExt,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::tools::{State, TestServer};

const BODY_LIMIT: usize = 1 << 20;

/// The open legacy sessions of one server run.
#[derive(Clone)]
pub struct Legacy {
    state: Arc<State>,
    sessions: Arc<Mutex<HashMap<String, mpsc::Sender<ClientJsonRpcMessage>>>>,
    ct: CancellationToken,
}

impl Legacy {
    pub fn new(state: Arc<State>, ct: CancellationToken) -> Self {
        Self {
            state,
            sessions: Arc::default(),
            ct,
        }
    }
}

#[derive(serde::Deserialize)]
pub struct SessionQuery {
    #[serde(rename = "sessionId")]
    session_id: String,
}

/// `GET /sse`: starts a session and streams its messages.
pub async fn open(
    AxumState(legacy): AxumState<Legacy>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (inbound_tx, inbound) = mpsc::channel(64);
    let (outbound, outbound_rx) = mpsc::channel::<ServerJsonRpcMessage>(64);
    if let Ok(mut sessions) = legacy.sessions.lock() {
        sessions.insert(id.clone(), inbound_tx);
    }
    let server = TestServer::new(legacy.state.clone());
    let sessions = legacy.sessions.clone();
    let ct = legacy.ct.child_token();
    let session_id = id.clone();
    tokio::spawn(async move {
        let transport = ChannelTransport { inbound, outbound };
        if let Ok(running) = server.serve_with_ct(transport, ct).await {
            let _ = running.waiting().await;
        }
        if let Ok(mut sessions) = sessions.lock() {
            sessions.remove(&session_id);
        }
    });
    let endpoint = Event::default()
        .event("endpoint")
        .data(format!("/message?sessionId={id}"));
    let messages = futures::stream::unfold(outbound_rx, |mut rx| async move {
        let message = rx.recv().await?;
        let data = serde_json::to_string(&message).unwrap_or_default();
        Some((Ok(Event::default().event("message").data(data)), rx))
    });
    Sse::new(futures::stream::once(async move { Ok(endpoint) }).chain(messages))
}

/// `POST /message?sessionId=…`: hands one JSON-RPC message to its session.
pub async fn post(
    AxumState(legacy): AxumState<Legacy>,
    Query(query): Query<SessionQuery>,
    request: Request,
) -> StatusCode {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return StatusCode::PAYLOAD_TOO_LARGE;
    };
    let Ok(mut message) = serde_json::from_slice::<ClientJsonRpcMessage>(&bytes) else {
        return StatusCode::BAD_REQUEST;
    };
    // Like rmcp's Streamable HTTP server: the HTTP request parts reach the handler's context.
    match &mut message {
        JsonRpcMessage::Request(request) => {
            request.request.extensions_mut().insert(parts);
        }
        JsonRpcMessage::Notification(notification) => {
            notification.notification.extensions_mut().insert(parts);
        }
        _ => {}
    }
    let sender = legacy
        .sessions
        .lock()
        .ok()
        .and_then(|sessions| sessions.get(&query.session_id).cloned());
    match sender {
        Some(sender) if sender.send(message).await.is_ok() => StatusCode::ACCEPTED,
        _ => StatusCode::NOT_FOUND,
    }
}

/// An rmcp server transport over two channels: POSTed messages in, SSE events out.
struct ChannelTransport {
    inbound: mpsc::Receiver<ClientJsonRpcMessage>,
    outbound: mpsc::Sender<ServerJsonRpcMessage>,
}

impl Transport<RoleServer> for ChannelTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: ServerJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let outbound = self.outbound.clone();
        async move {
            outbound
                .send(item)
                .await
                .map_err(|_| std::io::Error::other("the SSE stream is gone"))
        }
    }

    async fn receive(&mut self) -> Option<ClientJsonRpcMessage> {
        self.inbound.recv().await
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.inbound.close();
        Ok(())
    }
}
