//! A minimal HTTP/1.1 client over one keep-alive TCP connection, for the `rest`
//! scenario: requests with small bodies, a request body streamed by the caller, and
//! response bodies (`Content-Length` or chunked) passed to a callback as they arrive.
//! Hand-written so the load process needs no HTTP client crate and holds nothing
//! but one buffer per connection.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

pub struct Http {
    io: BufReader<TcpStream>,
    host: String,
}

/// A response's status line and the headers that frame its body.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub length: Option<u64>,
    pub chunked: bool,
    /// The server will close the connection after this response.
    pub close: bool,
}

impl Http {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Http> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Http {
            io: BufReader::with_capacity(64 * 1024, s),
            host: addr.to_string(),
        })
    }

    /// The request line and headers (`Host` and `Content-Length` added).
    pub fn head(&self, method: &str, path: &str, headers: &[(&str, &str)], length: u64) -> String {
        let mut h = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {length}\r\n",
            self.host
        );
        for (k, v) in headers {
            h.push_str(k);
            h.push_str(": ");
            h.push_str(v);
            h.push_str("\r\n");
        }
        h.push_str("\r\n");
        h
    }

    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.get_mut().write_all(bytes).await
    }

    pub async fn read_head(&mut self) -> anyhow::Result<Head> {
        let mut line = String::new();
        if self.io.read_line(&mut line).await? == 0 {
            bail!("connection closed before a response");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut head = Head {
            status,
            length: None,
            chunked: false,
            close: line.starts_with("HTTP/1.0"),
        };
        loop {
            line.clear();
            if self.io.read_line(&mut line).await? == 0 {
                bail!("connection closed in the response headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                return Ok(head);
            }
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                head.length = Some(v.parse().context("bad Content-Length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                head.close = v.eq_ignore_ascii_case("close");
            }
        }
    }

    /// Reads the body of `head`, handing each piece to `each`; returns its length.
    pub async fn read_body(
        &mut self,
        head: &Head,
        mut each: impl FnMut(&[u8]),
    ) -> anyhow::Result<u64> {
        const MAX_BUF: u64 = 256 * 1024;
        let cap = match (head.chunked, head.length) {
            (false, Some(n)) => n.clamp(1, MAX_BUF),
            _ => MAX_BUF,
        };
        let mut buf = vec![0u8; cap as usize];
        let mut total = 0u64;
        if head.chunked {
            let mut line = String::new();
            loop {
                line.clear();
                self.io.read_line(&mut line).await?;
                let size_text = line.trim().split(';').next().unwrap_or("");
                let mut left = u64::from_str_radix(size_text, 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                if left == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        if self.io.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                            return Ok(total);
                        }
                    }
                }
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    self.io.read_exact(&mut buf[..n]).await?;
                    each(&buf[..n]);
                    left -= n as u64;
                    total += n as u64;
                }
                line.clear();
                self.io.read_line(&mut line).await?;
            }
        }
        let Some(mut left) = head.length else {
            // Delimited by the connection's end.
            loop {
                let n = self.io.read(&mut buf).await?;
                if n == 0 {
                    return Ok(total);
                }
                each(&buf[..n]);
                total += n as u64;
            }
        };
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = self.io.read(&mut buf[..want]).await?;
            if n == 0 {
                bail!("connection closed with {left} bytes of the body missing");
            }
            each(&buf[..n]);
            left -= n as u64;
            total += n as u64;
        }
        Ok(total)
    }

    /// One request with a small body; the response status and body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(Head, Vec<u8>)> {
        let mut req = self
            .head(method, path, headers, body.len() as u64)
            .into_bytes();
        req.extend_from_slice(body);
        self.write(&req).await?;
        let head = self.read_head().await?;
        let mut out = Vec::new();
        self.read_body(&head, |b| out.extend_from_slice(b)).await?;
        Ok((head, out))
    }
}
