// A real OpenID Connect provider (node `oidc-provider`, certified) for the enforcer's login tests.
//
// Usage: node provider.js CONFIG.json
// CONFIG: { host, port (0 = any free port), tls: { cert, key } (PEM paths),
//           clients: [{ client_id, client_secret, redirect_uris, token_endpoint_auth_method? }],
//           users: [{ email, password, groups, name? }],
//           jwks: { keys: [private JWKs] }, cookie_keys: [..], registration_token }
// It listens first (so the issuer can name the port actually bound), then prints one JSON line
// {"ready": true, "issuer": ..., "port": ...} on stdout. Users log in through a small HTML form
// that checks the password (the interaction follows oidc-provider's own interaction example and
// its dev interaction's consent step); devInteractions, which checks nothing, is off.
import { readFileSync } from 'node:fs';
import https from 'node:https';

import Provider from 'oidc-provider';

const MAX_FORM_BYTES = 4096;

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = new Map(config.users.map((u) => [u.email, u]));

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, clientId, error) {
  const message = error ? `<p class="error">${escapeHtml(error)}</p>` : '';
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sign in</title></head>
<body>
<h1>Sign in to ${escapeHtml(clientId)}</h1>
${message}
<form id="login" method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label>Email <input id="username" name="username" type="text" autofocus></label>
<label>Password <input id="password" name="password" type="password"></label>
<button id="submit" type="submit">Sign in</button>
</form>
</body></html>
`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_FORM_BYTES) {
      throw new Error('form too large');
    }
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

let provider;

async function interaction(req, res, url) {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(\/login)?$/.exec(url.pathname);
  if (!match) {
    return false;
  }
  const details = await provider.interactionDetails(req, res);
  const { uid, prompt, params, session, grantId } = details;
  if (match[1] !== uid) {
    res.writeHead(400).end('interaction mismatch');
    return true;
  }
  const html = (status, body) => {
    res.writeHead(status, {
      'content-type': 'text/html; charset=utf-8',
      'cache-control': 'no-store',
    });
    res.end(body);
  };
  if (prompt.name === 'login') {
    if (req.method === 'GET' && !match[2]) {
      html(200, loginPage(uid, params.client_id));
      return true;
    }
    if (req.method === 'POST' && match[2]) {
      const form = await readForm(req);
      const user = users.get(form.get('username') || '');
      if (!user || user.password !== form.get('password')) {
        html(401, loginPage(uid, params.client_id, 'Invalid email or password.'));
        return true;
      }
      await provider.interactionFinished(req, res, { login: { accountId: user.email } }, {
        mergeWithLastSubmission: false,
      });
      return true;
    }
  }
  if (prompt.name === 'consent') {
    // First-party clients: consent is granted as asked (oidc-provider's dev interaction does the same).
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) {
      grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    }
    if (prompt.details.missingOIDCClaims) {
      grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    }
    if (prompt.details.missingResourceScopes) {
      for (const [indicator, scope] of Object.entries(prompt.details.missingResourceScopes)) {
        grant.addResourceScope(indicator, scope.join(' '));
      }
    }
    await provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, {
      mergeWithLastSubmission: true,
    });
    return true;
  }
  res.writeHead(400).end(`unexpected ${req.method} for prompt ${prompt.name}`);
  return true;
}

async function handle(req, res) {
  const url = new URL(req.url, 'https://localhost');
  try {
    if (await interaction(req, res, url)) {
      return;
    }
  } catch (err) {
    if (!res.headersSent) {
      res.writeHead(400, { 'content-type': 'text/plain' });
    }
    res.end(`interaction failed: ${err.message}\n`);
    return;
  }
  provider.callback()(req, res);
}

const server = https.createServer(
  { cert: readFileSync(config.tls.cert), key: readFileSync(config.tls.key) },
  (req, res) => {
    handle(req, res).catch((err) => {
      console.error(err);
      if (!res.headersSent) {
        res.writeHead(500);
      }
      res.end();
    });
  },
);

server.listen(config.port || 0, config.host || '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `https://${config.host || '127.0.0.1'}:${port}`;
  provider = new Provider(issuer, {
    clients: config.clients.map((c) => ({
      response_types: ['code'],
      grant_types: ['authorization_code'],
      token_endpoint_auth_method: 'client_secret_basic',
      ...c,
    })),
    jwks: config.jwks,
    cookies: { keys: config.cookie_keys },
    // Claims of the ID token itself (the enforcer reads the ID token, not the userinfo endpoint).
    conformIdTokenClaims: false,
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'groups'],
      groups: ['groups'],
    },
    scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
    features: {
      devInteractions: { enabled: false },
      // Tests register clients for an enforcer's port once it is known (RFC 7591), with a token.
      registration: { enabled: true, initialAccessToken: config.registration_token },
    },
    interactions: {
      url(ctx, interactionDetails) {
        return `/interaction/${interactionDetails.uid}`;
      },
    },
    pkce: { required: () => true },
    async findAccount(ctx, id) {
      const user = users.get(id);
      if (!user) {
        return undefined;
      }
      return {
        accountId: id,
        async claims() {
          return {
            sub: user.sub || id,
            email: user.email,
            email_verified: true,
            name: user.name || user.email,
            groups: user.groups || [],
          };
        },
      };
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  process.stdout.write(`${JSON.stringify({ ready: true, issuer, port })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
