// The home page's upload: XHR (for progress), XSRF token in a header, the new image shown at once.
(function () {
  "use strict";
  var form = document.getElementById("upload");
  if (!form) return;
  var input = document.getElementById("file");
  var button = document.getElementById("send");
  var progress = document.getElementById("progress");
  var status = document.getElementById("status");
  var grid = document.getElementById("grid");
  var count = document.getElementById("count");
  var empty = document.getElementById("empty");
  var fileName = document.getElementById("file-name");
  var noFile = fileName.textContent;
  // The words come with the page, in its language (home.html's data-msg-* attributes).
  var words = form.dataset;
  // Errors come as JSON like the image itself: {"error": {"code": ..., "message": ...}}.
  var messages = {
    unauthorized: words.msgUnauthorized,
    forbidden: words.msgForbidden,
    quota_exceeded: words.msgQuotaExceeded,
    too_large: words.msgTooLarge,
    unsupported_media_type: words.msgUnsupportedMediaType,
    invalid_image: words.msgInvalidImage,
    invalid_field: words.msgInvalidImage,
    insufficient_storage: words.msgInsufficientStorage,
    unavailable: words.msgUnavailable
  };

  function errorCode(xhr) {
    try {
      return JSON.parse(xhr.responseText).error.code;
    } catch (e) {
      return xhr.status === 503 ? "unavailable" : null;  // a proxy's page when no process answers
    }
  }

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "message is-error" : "message";
  }

  function showChosen() {
    var file = input.files && input.files[0];
    fileName.textContent = file ? file.name : noFile;
  }

  function show(image) {
    var item = document.createElement("li");
    var link = document.createElement("a");
    var img = document.createElement("img");
    link.href = image.url;
    img.src = image.thumbnails["320"];
    img.alt = words.msgImage;
    img.decoding = "async";
    link.appendChild(img);
    item.appendChild(link);
    grid.insertBefore(item, grid.firstChild);
    count.textContent = String(Number(count.textContent) + 1);
    empty.hidden = true;
  }

  input.addEventListener("change", function () {
    showChosen();
    say("", false);
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = input.files && input.files[0];
    if (!file) { say(words.msgChoose, true); return; }
    var data = new FormData();
    data.append("image", file);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-XSRFToken", form.elements["_xsrf"].value);
    xhr.upload.onprogress = function (e) {
      if (e.lengthComputable) progress.value = Math.round((e.loaded / e.total) * 100);
    };
    xhr.onload = function () {
      button.disabled = false;
      progress.hidden = true;
      if (xhr.status === 201) {
        show(JSON.parse(xhr.responseText).image);
        form.reset();
        showChosen();
        say(words.msgUploaded, false);
      } else {
        say(messages[errorCode(xhr)] || words.msgFailed.replace("{status}", String(xhr.status)), true);
      }
    };
    xhr.onerror = function () {
      button.disabled = false;
      progress.hidden = true;
      say(words.msgNetwork, true);
    };
    button.disabled = true;
    progress.value = 0;
    progress.hidden = false;
    say(words.msgUploading, false);
    xhr.send(data);
  });
})();
