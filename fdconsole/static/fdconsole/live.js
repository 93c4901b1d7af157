/* Live pages: follows the console's WebSocket feed (ws/cluster/ or ws/topics/<topic>/), re-renders the
   node table, the topic's figures, charts and events, and reconnects when the console restarts. */
(function () {
  "use strict";
  var badge = document.getElementById("live");
  if (!badge) return;
  var WINDOW_S = 300, EVENTS_SHOWN = 100, MAX_BACKOFF_MS = 5000;
  var live = window.fdLive = {heartbeatDelaysMs: [], messages: 0, clockOffsetMs: 0};
  var beats = {};           // node -> heartbeat_ts last seen, to measure heartbeat -> page delays
  var nodes = [];           // the last node list received
  var series = [];          // chart points, oldest first
  var backoff = 500;

  function setState(state, text) { badge.dataset.state = state; badge.textContent = text; }
  function serverNow() { return (Date.now() + live.clockOffsetMs) / 1000; }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + badge.dataset.url);
    socket.onopen = function () { backoff = 500; setState("live", "live"); };
    socket.onmessage = function (event) { receive(JSON.parse(event.data)); };
    socket.onclose = function () {
      setState("reconnecting", "reconnecting…");
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    };
  }

  function receive(message) {
    live.messages++;
    live.clockOffsetMs = message.at * 1000 - Date.now();
    var problem = document.getElementById("live-error");
    if (problem) { problem.textContent = message.error || ""; problem.hidden = !message.error; }
    measureHeartbeats(message.nodes || [], !!message.hello);
    nodes = message.nodes || [];
    renderNodes(nodes);
    if (message.type === "cluster") renderTopics(message.topics || []);
    if (message.type === "topic") {
      if (message.hello) {
        series = message.series || [];
        clearEvents();
      } else if (message.point) {
        series.push(message.point);
        while (series.length && series[0].t < serverNow() - 2 * WINDOW_S) series.shift();
      }
      addEvents(message.events || []);
      renderFigures(message);
      renderCharts();
    }
  }

  /* Browser receipt time minus the heartbeat's own timestamp: what "live" costs, end to end. */
  function measureHeartbeats(list, isHello) {
    list.forEach(function (node) {
      var ts = node.heartbeat_ts;
      if (ts == null) return;
      if (!isHello && beats[node.name] !== undefined && beats[node.name] !== ts) {
        live.heartbeatDelaysMs.push(Math.round(Date.now() - ts * 1000));
        if (live.heartbeatDelaysMs.length > 1000) live.heartbeatDelaysMs.shift();
      }
      beats[node.name] = ts;
    });
  }

  // -- nodes ---------------------------------------------------------------------------------------
  var table = document.getElementById("nodes"), empty = document.getElementById("nodes-empty");
  var withTopic = !!(table && table.hasAttribute("data-with-topic"));

  function cell(row, field, content, numeric) {
    var td = document.createElement("td");
    td.dataset.field = field;
    if (numeric) td.className = "num";
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    row.appendChild(td);
  }

  function link(href, text, title) {
    var a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (title) a.title = title;
    return a;
  }

  function badgeFor(kind, value) {
    var span = document.createElement("span");
    span.className = kind + " " + kind + "-" + value;
    span.textContent = value;
    return span;
  }

  function age(node) {
    if (node.heartbeat_ts == null) return "never";
    return Math.max(0, serverNow() - node.heartbeat_ts).toFixed(1) + " s";
  }

  function dash(value) { return value == null ? "–" : String(value); }

  /* "37 / 512": KV cache blocks in use of the node's total; a dash when its engine does not say. */
  function kvBlocks(node) {
    if (node.kv_blocks_used == null && node.kv_blocks_total == null) return "–";
    return dash(node.kv_blocks_used) + " / " + dash(node.kv_blocks_total);
  }

  /* "1 · killed by SIGKILL": how often fdcluster started the node's process again, and how it last ended. */
  function restarts(node) {
    if (node.restarts == null) return "–";
    return String(node.restarts) + (node.last_exit_status ? " · " + node.last_exit_status : "");
  }

  function renderNodes(list) {
    if (!table) return;
    var body = table.tBodies[0];
    var rows = list.map(function (node) {
      var row = document.createElement("tr");
      row.dataset.node = node.name;
      cell(row, "name", link("/admin/nodes/node/?q=" + encodeURIComponent(node.name), node.name, "manage in the admin"));
      if (withTopic) cell(row, "topic", link("/topics/" + encodeURIComponent(node.topic) + "/", node.topic));
      cell(row, "role", node.role);
      cell(row, "state", badgeFor("state", node.state));
      cell(row, "load_score", dash(node.load_score), true);
      cell(row, "heartbeat_age", age(node), true);
      cell(row, "queue_length", dash(node.queue_length), true);
      cell(row, "running", node.running_count ?
        link("/requests/?status=running&node=" + encodeURIComponent(node.name), String(node.running_count)) : "0", true);
      cell(row, "batch_size", dash(node.batch_size), true);
      cell(row, "waiting", dash(node.waiting), true);
      cell(row, "kv_blocks", kvBlocks(node), true);
      cell(row, "prefix_cache_hit_rate", node.prefix_cache_hit_pct == null ? "–" : node.prefix_cache_hit_pct.toFixed(1) + "%", true);
      cell(row, "preemptions", dash(node.preemptions), true);
      cell(row, "tokens_per_s", node.tokens_per_s == null ? "–" : node.tokens_per_s.toFixed(1), true);
      cell(row, "steals", dash(node.requests_stolen), true);
      cell(row, "run", dash(node.requests_run), true);
      cell(row, "restarts", restarts(node));
      if (node.last_exit_at) row.lastChild.title = "last ended " + node.last_exit_at;
      return row;
    });
    body.replaceChildren.apply(body, rows);
    table.hidden = list.length === 0;
    if (empty) empty.hidden = list.length !== 0;
  }

  function tickAges() {
    if (!table) return;
    nodes.forEach(function (node) {
      var row = table.querySelector('tr[data-node="' + CSS.escape(node.name) + '"] td[data-field="heartbeat_age"]');
      if (row) row.textContent = age(node);
    });
  }

  // -- the cluster page's topics --------------------------------------------------------------------
  function renderTopics(topics) {
    topics.forEach(function (topic) {
      var row = document.querySelector('#topics tr[data-topic="' + CSS.escape(topic.name) + '"]');
      if (!row) return;
      set(row, "nodes", topic.nodes);
      set(row, "live_nodes", topic.live_nodes);
      set(row, "waiting", topic.waiting);
      if (topic.point) { set(row, "rps", topic.point.rps); set(row, "tps", topic.point.tps); }
      /* Where its Redis is, and whether it answers (the full notice in the badge's tooltip). */
      var where = row.querySelector('[data-field="redis"] [data-where]');
      var down = row.querySelector('[data-field="redis"] [data-redis-error]');
      if (where && topic.redis) where.textContent = topic.redis;
      if (down) { down.hidden = !topic.error; down.title = topic.error || ""; }
    });
  }

  function set(row, field, value) {
    var td = row.querySelector('[data-field="' + field + '"]');
    if (td) td.textContent = dash(value);
  }

  // -- the topic page's figures, charts and events --------------------------------------------------
  function renderFigures(message) {
    var figure = function (name, value) {
      var node = document.querySelector('[data-stat="' + name + '"]');
      if (node) node.textContent = dash(value);
    };
    var last = series.length ? series[series.length - 1] : null;
    figure("rps", last ? last.rps : null);
    figure("tps", last ? last.tps : null);
    figure("waiting", message.waiting);
    figure("live", (message.nodes || []).filter(function (n) {
      return n.state === "idle" || n.state === "busy" || n.state === "draining";
    }).length);
  }

  function renderCharts() {
    if (!window.fdCharts) return;
    var now = serverNow();
    var pick = function (field) {  // points without the field (older points, old engines) are left out
      return series.filter(function (p) { return p[field] != null; }).map(function (p) { return [p.t, p[field]]; });
    };
    chart("chart-rps", [{name: "finished", points: pick("rps")}], now);
    chart("chart-tps", [{name: "tokens", points: pick("tps")}], now);
    chart("chart-queue", [{name: "waiting", points: pick("queue")}], now);
    var names = {};
    series.forEach(function (p) { Object.keys(p.load || {}).forEach(function (n) { names[n] = true; }); });
    var loadLines = Object.keys(names).sort().map(function (name, i) {
      return {name: name, color: fdCharts.palette[i % fdCharts.palette.length],
              points: series.filter(function (p) { return p.load && name in p.load; })
                            .map(function (p) { return [p.t, p.load[name]]; })};
    });
    chart("chart-load", loadLines, now);
    legend("legend-load", loadLines);
    var kvLines = [{name: "in use", color: fdCharts.palette[0], points: pick("kv_used")},
                   {name: "total", color: fdCharts.palette[7], points: pick("kv_total")}];
    chart("chart-kv", kvLines, now);
    legend("legend-kv", kvLines);
    chart("chart-batch", [{name: "batch", points: pick("batch")}], now);
  }

  function legend(id, lines) {
    var box = document.getElementById(id);
    if (!box) return;
    box.replaceChildren.apply(box, lines.map(function (line) {
      var item = document.createElement("span");
      item.style.setProperty("--swatch", line.color);
      item.textContent = line.name;
      return item;
    }));
  }

  function chart(id, lines, now) {
    var svg = document.getElementById(id);
    if (svg) fdCharts.draw(svg, lines, WINDOW_S, now);
  }

  var DESCRIBE = {
    steal: function (e) { return e.node + " stole " + e.count + " request(s) from " + e.from; },
    expired: function (e) { return "request " + e.request_id + " expired" + (e.node ? " on " + e.node : "") + ": " + e.message; },
    failover: function (e) { return "request " + e.request_id + " moved from " + (e.from || "?") + " to " + e.to + " (its node stopped renewing it)"; },
    reclaimed: function (e) { return e.to + " took back request " + e.request_id + " after restarting"; },
    resubmitted: function (e) { return "request " + e.request_id + " was queued again on " + e.to + " from its record (Redis had lost it), after " + e.tokens + " token(s)"; },
    rehomed: function (e) { return e.count + " queued request(s) moved off dead node " + e.from; },
    node_expired: function (e) { return "node " + e.node + " expired and left the registry (" + e.moved + " request(s) moved)"; },
    node_joined: function (e) { return "node " + e.node + " (" + e.role + ") joined"; },
    node_recovered: function (e) { return "node " + e.node + " is back after going stale"; },
    node_died: function (e) { return "node " + e.node + " died: no heartbeat"; },
    node_stopped: function (e) { return "node " + e.node + " stopped"; },
    node_stale: function (e) { return "node " + e.node + " is stale: heartbeats are late"; },
    node_draining: function (e) { return "node " + e.node + " is " + (e.state || "draining") + ": it takes no new work"; },
    node_enabled: function (e) { return "node " + e.node + " was enabled again"; },
    node_restarted: function (e) { return "node " + e.node + "'s process ended (" + e.status + "); fdcluster started it again"; }
  };
  var eventList = document.getElementById("events"), eventsEmpty = document.getElementById("events-empty");

  function clearEvents() { if (eventList) eventList.replaceChildren(); }

  function addEvents(events) {
    if (!eventList) return;
    events.forEach(function (e) {
      if (eventList.querySelector('li[data-id="' + CSS.escape(e.id) + '"]')) return;  // hello and a tick may overlap
      var item = document.createElement("li");
      item.dataset.kind = e.kind;
      item.dataset.id = e.id;
      var when = document.createElement("time");
      when.textContent = new Date(parseFloat(e.at) * 1000).toLocaleTimeString();
      var text = document.createElement("span");
      text.textContent = (DESCRIBE[e.kind] || function () { return e.kind; })(e);
      item.append(when, badgeFor("kind", e.kind.replace("node_", "")), text);
      eventList.insertBefore(item, eventList.firstChild);
    });
    while (eventList.children.length > EVENTS_SHOWN) eventList.removeChild(eventList.lastChild);
    if (eventsEmpty) eventsEmpty.hidden = eventList.children.length > 0;
  }

  window.addEventListener("resize", renderCharts);
  setInterval(tickAges, 250);
  setInterval(renderCharts, 5000);  // the window slides even when no point arrives
  connect();
})();
