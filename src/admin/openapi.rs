//! The OpenAPI 3.1 document of the admin API and a page that renders it with no CDN.

/// `/openapi.json`.
pub const SPEC: &str = include_str!("openapi.json");

/// `/docs`: a self-contained page that lists the routes and schemas of `/openapi.json`.
pub const DOCS_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>budget-proxy admin API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code,pre{font:13px ui-monospace,monospace;background:#f4f4f4;border-radius:4px}
pre{padding:.6rem;overflow:auto} .m{display:inline-block;min-width:4rem;font-weight:600}
.get{color:#0a6}.put{color:#a60}.post{color:#06a} section{border-top:1px solid #ddd;padding:.4rem 0}
</style></head><body>
<h1 id="title">budget-proxy admin API</h1><p id="desc"></p><div id="routes">Loading /openapi.json…</div>
<h2>Schemas</h2><div id="schemas"></div>
<script>
fetch('/openapi.json').then(r => r.json()).then(spec => {
  document.getElementById('title').textContent = spec.info.title + ' ' + spec.info.version;
  document.getElementById('desc').textContent = spec.info.description;
  const routes = document.getElementById('routes'); routes.textContent = '';
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const s = document.createElement('section');
      const codes = Object.keys(op.responses).join(', ');
      s.innerHTML = '<span class="m ' + method + '">' + method.toUpperCase() + '</span> <code></code> <span></span><br><small>responses: ' + codes + '</small>';
      s.querySelector('code').textContent = path;
      s.querySelector('span:last-of-type').textContent = ' — ' + (op.summary || '');
      routes.appendChild(s);
    }
  }
  const schemas = document.getElementById('schemas');
  for (const [name, schema] of Object.entries(spec.components.schemas)) {
    const h = document.createElement('h3'); h.textContent = name; schemas.appendChild(h);
    const p = document.createElement('pre'); p.textContent = JSON.stringify(schema, null, 2); schemas.appendChild(p);
  }
});
</script></body></html>"#;
