//! A TCP relay in front of ClickHouse that a benchmark can cut: a ClickHouse
//! outage as the processor sees it (connections refused and dropped),
//! without touching the server others use.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    /// `http://127.0.0.1:PORT`: give it to the processor as its ClickHouse URL.
    pub url: String,
    up: watch::Sender<bool>,
}

impl Relay {
    /// Relays 127.0.0.1:<free port> to `target` (`host:port`) on the current
    /// tokio runtime.
    pub async fn start(target: String) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let (up, watch) = watch::channel(true);
        let target = Arc::new(target);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*watch.borrow() {
                    drop(client); // down: refused, as far as a client can tell
                    continue;
                }
                tokio::spawn(relay(client, target.clone(), watch.clone()));
            }
        });
        Ok(Relay {
            url: format!("http://{addr}"),
            up,
        })
    }

    /// Drops every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        let _ = self.up.send(false);
    }

    pub fn restore(&self) {
        let _ = self.up.send(true);
    }
}

async fn relay(mut client: TcpStream, target: Arc<String>, mut up: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target.as_str()).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = up.wait_for(|up| !*up) => {}
    }
}

/// `host:port` of an `http://host:port[/...]` URL.
pub fn host_port(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    Some(if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_of_a_url() {
        assert_eq!(
            host_port("http://127.0.0.1:8123").as_deref(),
            Some("127.0.0.1:8123")
        );
        assert_eq!(
            host_port("http://clickhouse/").as_deref(),
            Some("clickhouse:80")
        );
        assert_eq!(host_port("https://x:1"), None);
    }

    #[tokio::test]
    async fn a_cut_relay_refuses_and_a_restored_one_relays() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                    }
                });
            }
        });
        let relay = Relay::start(target).await.unwrap();
        let addr = relay.url.trim_start_matches("http://").to_owned();
        let roundtrip = |addr: String| async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf)
        };
        assert_eq!(roundtrip(addr.clone()).await, Some(*b"ping"));
        relay.cut();
        assert_eq!(roundtrip(addr.clone()).await, None);
        relay.restore();
        assert_eq!(roundtrip(addr).await, Some(*b"ping"));
    }
}
