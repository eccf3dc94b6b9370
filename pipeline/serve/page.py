"""The chat page served at / (no package data to ship: the page is this string). Upload an image, ask, watch the
answer stream: the browser posts to /v1/chat/completions with stream=true and reads the server-sent events with
fetch's body reader. __MODEL_NAME__ is replaced by the served model's id (a JS string literal).
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>PILL chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .75rem; min-height: 10rem; margin-bottom: .75rem; }
  .turn { margin: .4rem 0; white-space: pre-wrap; }
  .user { color: #134; font-weight: 600; }
  .assistant { color: #222; }
  .turn img { max-height: 8rem; display: block; margin: .25rem 0; }
  form { display: grid; gap: .5rem; }
  #preview { max-height: 10rem; }
  #status { color: #a33; min-height: 1.2rem; }
  .row { display: flex; gap: .5rem; align-items: center; }
  #question { flex: 1; padding: .4rem; }
</style>
</head>
<body>
<h1>PILL chat &mdash; <span id="model"></span></h1>
<div id="log"></div>
<form id="form">
  <div class="row"><label for="image">Image</label><input id="image" type="file" accept="image/*"></div>
  <img id="preview" alt="" hidden>
  <div class="row">
    <input id="question" type="text" placeholder="Ask about the image" autocomplete="off">
    <button id="send" type="submit">Send</button>
  </div>
  <div class="row">
    <label for="key">API key</label><input id="key" type="password" placeholder="if the server has one">
  </div>
</form>
<div id="status"></div>
<script>
"use strict";
const MODEL = __MODEL_NAME__;
const messages = [];
let imageUrl = null;
document.getElementById("model").textContent = MODEL;

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

document.getElementById("image").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  imageUrl = file ? await readAsDataURL(file) : null;
  const preview = document.getElementById("preview");
  preview.hidden = !imageUrl;
  if (imageUrl) preview.src = imageUrl;
});

function addTurn(role, text, image) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  if (image) { const img = document.createElement("img"); img.src = image; div.appendChild(img); }
  const span = document.createElement("span");
  span.textContent = (role === "user" ? "You: " : "") + text;
  div.appendChild(span);
  document.getElementById("log").appendChild(div);
  return span;
}

async function ask(question) {
  const content = [{type: "text", text: question}];
  if (imageUrl) content.unshift({type: "image_url", image_url: {url: imageUrl}});
  messages.push({role: "user", content});
  addTurn("user", question, imageUrl);
  imageUrl = null;
  document.getElementById("preview").hidden = true;
  document.getElementById("image").value = "";
  const out = addTurn("assistant", "");
  out.id = "answer-" + messages.length;
  out.dataset.done = "false";
  out.dataset.chunks = "0";  // content events shown so far: the answer streams in, it does not arrive whole
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers, body: JSON.stringify({model: MODEL, messages, stream: true}),
  });
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({error: {message: resp.statusText}}));
    throw new Error(err.error.message);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", answer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      const delta = (event.choices[0] || {}).delta || {};
      if (delta.content) {
        answer += delta.content;
        out.textContent = answer;
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
      }
    }
  }
  messages.push({role: "assistant", content: answer});
  out.dataset.done = "true";
}

document.getElementById("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = document.getElementById("question");
  const status = document.getElementById("status");
  const button = document.getElementById("send");
  if (!q.value.trim()) return;
  button.disabled = true;
  status.textContent = "";
  try {
    await ask(q.value);
    q.value = "";
  } catch (err) {
    messages.pop();
    status.textContent = "Error: " + err.message;
  } finally {
    button.disabled = false;
  }
});
</script>
</body>
</html>
"""
