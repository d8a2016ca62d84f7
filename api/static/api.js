// The API client of the page: fetch and XHR upload with the stored API key; asks for a key once on 401.

const KEY = "nucseg.apiKey";
let asking = null;

export function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Show the key dialog (once at a time); resolves when a key is stored. */
function askForKey() {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("api-key");
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (input.value) sessionStorage.setItem(KEY, input.value);
      asking = null;
      resolve(Boolean(input.value));
    }, { once: true });
    dialog.showModal();
    input.focus();
  });
  return asking;
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function toError(resp) {
  let code = `http_${resp.status}`;
  let message = resp.statusText || "request failed";
  try {
    const body = await resp.json();
    code = body.error?.code ?? code;
    message = body.error?.message ?? message;
  } catch { /* not JSON */ }
  return new ApiError(resp.status, code, message);
}

/** fetch() an API path; JSON body back (null for 204). Throws ApiError. */
export async function api(path, options = {}, retried = false) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (resp.status === 401 && !retried && !sessionStorage.getItem(KEY) && await askForKey()) {
    return api(path, options, true);
  }
  if (!resp.ok) throw await toError(resp);
  if (resp.status === 204) return null;
  return resp.json();
}

/** Upload a file as multipart with XHR so that the upload progress can be shown. */
export function upload(file, optionsJson, onProgress, retried = false) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file, file.name);
    if (optionsJson) form.append("options", optionsJson);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", async () => {
      const body = xhr.response;
      if (xhr.status === 401 && !retried && !sessionStorage.getItem(KEY) && await askForKey()) {
        upload(file, optionsJson, onProgress, true).then(resolve, reject);
      } else if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve(body);
      } else {
        reject(new ApiError(xhr.status, body?.error?.code ?? `http_${xhr.status}`,
          body?.error?.message ?? "upload failed"));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network_error", "the upload did not reach the server")));
    xhr.send(form);
  });
}
