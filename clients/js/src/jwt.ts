/** The claims the client reads from an access token (no signature check: the server does that). */
export interface TokenClaims {
  sub?: string;
  exp?: number;
  iat?: number;
  role?: string;
  email?: string;
  session_id?: string;
}

function base64UrlDecode(s: string): string {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (s.length % 4)) % 4);
  const binary = atob(b64);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** Decodes a JWT's payload; `null` when the token is not a JWT. */
export function decodeToken(token: string | null | undefined): TokenClaims | null {
  if (!token) return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const claims: unknown = JSON.parse(base64UrlDecode(parts[1]!));
    return claims && typeof claims === 'object' ? (claims as TokenClaims) : null;
  } catch {
    return null;
  }
}

/** Expiry of a token in ms since the epoch, or `null` when it has none. */
export function tokenExpiresAt(token: string | null | undefined): number | null {
  const exp = decodeToken(token)?.exp;
  return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : null;
}

/**
 * When to renew a token: `marginMs` before it expires, but never earlier than
 * three quarters of its lifetime (short-lived tokens are not renewed right after
 * they were issued). Returns ms since the epoch, or `null` for tokens without `exp`.
 */
export function renewalTime(token: string | null | undefined, marginMs: number, now = Date.now()): number | null {
  const claims = decodeToken(token);
  if (!claims || typeof claims.exp !== 'number') return null;
  const exp = claims.exp * 1000;
  const issued = typeof claims.iat === 'number' ? claims.iat * 1000 : Math.min(now, exp);
  const lifetime = Math.max(0, exp - issued);
  const margin = Math.min(marginMs, lifetime / 4);
  return exp - margin;
}
