//! A thin streaming-replication client on `postgres-protocol`.
//!
//! crates.io's tokio-postgres cannot enter CopyBoth mode, so this speaks the wire
//! protocol for the one thing it must do: open a `replication=database` session,
//! authenticate (trust, cleartext, MD5 or SCRAM-SHA-256), run `START_REPLICATION`, then
//! exchange CopyData frames. Everything else (slots, catalog, SQL) goes through
//! tokio-postgres on ordinary connections.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

use aether_core::lsn::PgLsn;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("replication connection i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("server error: {message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection closed by the server")]
    Closed,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What the server sends while streaming.
#[derive(Debug)]
pub enum ReplicationFrame {
    /// `w`: a chunk of WAL, here one pgoutput message.
    XLogData {
        wal_start: PgLsn,
        wal_end: PgLsn,
        data: Bytes,
    },
    /// `k`: a keepalive; `reply_requested` means answer now or be timed out.
    Keepalive {
        wal_end: PgLsn,
        reply_requested: bool,
    },
}

pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl ReplicationConn {
    /// Connects with the settings of `config` in `replication=database` mode.
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self, ConnError> {
        let user = config
            .get_user()
            .ok_or_else(|| ConnError::Protocol("no user in the connection settings".into()))?;
        let dbname = config.get_dbname().unwrap_or(user);
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut last_err = None;
        let mut stream: Option<Box<dyn Stream>> = None;
        for host in config.get_hosts() {
            let attempt: std::io::Result<Box<dyn Stream>> = match host {
                Host::Tcp(h) => tokio::net::TcpStream::connect((h.as_str(), port))
                    .await
                    .map(|s| {
                        let _ = s.set_nodelay(true);
                        Box::new(s) as Box<dyn Stream>
                    }),
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(|s| Box::new(s) as Box<dyn Stream>)
                }
            };
            match attempt {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let stream = match stream {
            Some(s) => s,
            None => {
                return Err(last_err
                    .map(ConnError::Io)
                    .unwrap_or_else(|| ConnError::Protocol("no host to connect to".into())));
            }
        };
        let mut conn = ReplicationConn {
            stream,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
        };
        // Text output of the walsender follows these settings: pin them so value
        // conversion does not depend on the server's defaults.
        let params = [
            ("user", user),
            ("database", dbname),
            ("replication", "database"),
            ("application_name", "aether"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("extra_float_digits", "3"),
            ("IntervalStyle", "iso_8601"),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.write_buf)?;
        conn.flush().await?;
        conn.authenticate(user, config.get_password()).await?;
        conn.wait_ready().await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), ConnError> {
        let need_password =
            || ConnError::Protocol("the server asks for a password and none was given".into());
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match self.read_message().await? {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(
                        password.ok_or_else(need_password)?,
                        &mut self.write_buf,
                    )?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(
                        user.as_bytes(),
                        password.ok_or_else(need_password)?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut found = false;
                    while let Some(m) = mechanisms.next()? {
                        found |= m == sasl::SCRAM_SHA_256;
                    }
                    if !found {
                        return Err(ConnError::Protocol("server offers no SCRAM-SHA-256".into()));
                    }
                    let s = sasl::ScramSha256::new(
                        password.ok_or_else(need_password)?,
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.write_buf,
                    )?;
                    self.flush().await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("unexpected SASL continue".into()))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("unexpected SASL final".into()))?;
                    s.finish(body.data())?;
                }
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {
                    return Err(ConnError::Protocol(
                        "unsupported authentication method".into(),
                    ));
                }
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), ConnError> {
        loop {
            match self.read_message().await? {
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    /// Starts streaming from `slot`. `start` of zero means "from the slot's
    /// confirmed position". `publications`: one name, or several separated by
    /// commas.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        publications: &str,
        start: PgLsn,
    ) -> Result<(), ConnError> {
        let names: Vec<String> = publications
            .split(',')
            .map(|p| quote_ident(p.trim()))
            .collect();
        let query = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(slot),
            start,
            quote_literal(&names.join(",")),
        );
        frontend::query(&query, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            // postgres-protocol does not know CopyBothResponse ('W'): frame it here.
            if self.take_copy_both_response().await? {
                return Ok(());
            }
            match self.read_message().await? {
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_) => {}
                _ => return Err(ConnError::Protocol("expected CopyBothResponse".into())),
            }
        }
    }

    /// Reads the next replication frame. Cancel-safe: a partially read message
    /// stays in the buffer.
    pub async fn next_frame(&mut self) -> Result<ReplicationFrame, ConnError> {
        loop {
            match self.read_message().await? {
                backend::Message::CopyData(body) => {
                    let mut data = body.into_bytes();
                    if data.is_empty() {
                        return Err(ConnError::Protocol("empty CopyData".into()));
                    }
                    let tag = data.get_u8();
                    return match tag {
                        b'w' => {
                            if data.len() < 24 {
                                return Err(ConnError::Protocol("short XLogData header".into()));
                            }
                            let wal_start = PgLsn(data.get_u64());
                            let wal_end = PgLsn(data.get_u64());
                            let _clock = data.get_i64();
                            Ok(ReplicationFrame::XLogData {
                                wal_start,
                                wal_end,
                                data,
                            })
                        }
                        b'k' => {
                            if data.len() < 17 {
                                return Err(ConnError::Protocol("short keepalive".into()));
                            }
                            let wal_end = PgLsn(data.get_u64());
                            let _clock = data.get_i64();
                            let reply_requested = data.get_u8() == 1;
                            Ok(ReplicationFrame::Keepalive {
                                wal_end,
                                reply_requested,
                            })
                        }
                        other => Err(ConnError::Protocol(format!(
                            "unknown CopyData tag {other:#04x}"
                        ))),
                    };
                }
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                backend::Message::CopyDone => return Err(ConnError::Closed),
                backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_) => {}
                _ => {
                    return Err(ConnError::Protocol(
                        "unexpected message while streaming".into(),
                    ));
                }
            }
        }
    }

    /// Sends a standby status update. `flush` is what PostgreSQL may forget.
    pub async fn send_status(
        &mut self,
        write: PgLsn,
        flush: PgLsn,
        reply: bool,
    ) -> Result<(), ConnError> {
        let now_us = chrono::Utc::now().timestamp_micros() - super::pgoutput::PG_EPOCH_OFFSET_US;
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(write.0);
        payload.put_u64(flush.0);
        payload.put_u64(flush.0);
        payload.put_i64(now_us);
        payload.put_u8(u8::from(reply));
        frontend::CopyData::new(payload.freeze())?.write(&mut self.write_buf);
        self.flush().await
    }

    /// Consumes a CopyBothResponse if it is the next message; `false` if another
    /// message is next (left in the buffer).
    async fn take_copy_both_response(&mut self) -> Result<bool, ConnError> {
        while self.read_buf.len() < 5 {
            self.fill().await?;
        }
        if self.read_buf[0] != b'W' {
            return Ok(false);
        }
        let len = i32::from_be_bytes([
            self.read_buf[1],
            self.read_buf[2],
            self.read_buf[3],
            self.read_buf[4],
        ]);
        let len = usize::try_from(len)
            .map_err(|_| ConnError::Protocol("negative message length".into()))?;
        if len < 4 {
            return Err(ConnError::Protocol("bad CopyBothResponse length".into()));
        }
        while self.read_buf.len() < 1 + len {
            self.fill().await?;
        }
        self.read_buf.advance(1 + len);
        Ok(true)
    }

    async fn fill(&mut self) -> Result<(), ConnError> {
        if self.read_buf.capacity() - self.read_buf.len() < 8192 {
            self.read_buf.reserve(64 * 1024);
        }
        let n = self.stream.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        self.stream.write_all(&self.write_buf).await?;
        self.write_buf.clear();
        self.stream.flush().await?;
        Ok(())
    }

    async fn read_message(&mut self) -> Result<backend::Message, ConnError> {
        loop {
            if let Some(msg) = backend::Message::parse(&mut self.read_buf)? {
                return Ok(msg);
            }
            self.fill().await?;
        }
    }
}

fn server_error(body: &backend::ErrorResponseBody) -> ConnError {
    let mut fields = body.fields();
    let (mut code, mut message) = (String::new(), String::new());
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    ConnError::Server { code, message }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
