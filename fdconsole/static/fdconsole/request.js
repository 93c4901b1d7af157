/* One request's page: its tokens as they stream (Server-Sent Events), then its final state. */
(function () {
  "use strict";
  var section = document.getElementById("request");
  if (!section) return;
  var output = document.getElementById("output"), count = document.getElementById("token-count");
  var state = document.getElementById("stream-state"), cancel = document.getElementById("cancel");
  var delivered = -1;
  var source = new EventSource(section.dataset.stream);

  output.textContent = "";  // the stream replays from the first token; each index is shown once
  state.textContent = "(streaming…)";

  source.addEventListener("token", function (event) {
    var token = JSON.parse(event.data);
    if (token.index <= delivered) return;
    delivered = token.index;
    output.textContent += token.text;
    count.textContent = String(token.index + 1);
  });

  source.addEventListener("done", function (event) {
    source.close();
    finish(JSON.parse(event.data));
  });

  source.addEventListener("error", function (event) {
    if (event.data) {  // the server's own error event (Redis unavailable); the browser retries otherwise
      var error = JSON.parse(event.data);
      state.textContent = "(" + error.message + ")";
      source.close();
    } else if (source.readyState !== EventSource.CLOSED) {
      state.textContent = "(reconnecting…)";
    }
  });

  function ms(from, to) {
    return from && to ? Math.round(Date.parse(to) - Date.parse(from)) + " ms" : "–";
  }

  function field(name, value) {
    var node = section.querySelector('[data-field="' + name + '"]');
    if (node) node.textContent = value == null || value === "" ? "–" : String(value);
    return node;
  }

  function finish(request) {
    var status = field("status", request.status);
    status.className = "status status-" + request.status;
    field("finish_reason", request.finish_reason || "");
    field("home_node", request.home_node);
    field("executed_by", request.executed_by);
    field("prefill_node", request.prefill_node);
    field("decode_node", request.decode_node);
    field("queued_ms", ms(request.created_at, request.started_at));
    field("first_token_ms", ms(request.created_at, request.first_token_at));
    field("total_ms", ms(request.created_at, request.finished_at));
    count.textContent = String(request.output_token_ids.length);
    output.textContent = request.output_text;
    state.textContent = "(complete)";
    if (cancel) cancel.disabled = true;
    if (request.error) {
      var error = document.getElementById("request-error");
      error.textContent = request.error.code + ": " + request.error.message;
      error.hidden = false;
    }
    var object = document.getElementById("api-object");
    if (object) object.textContent = JSON.stringify(request, null, 2);
  }
})();
