/* Small SVG line charts for the live pages: no library, no network (the console works offline). */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#2f5bd3", "#12805c", "#b54708", "#9e2a9c", "#0e7490", "#b42318", "#4d7c0f", "#6b7280"];

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    var step = Math.pow(10, Math.floor(Math.log10(value)));
    var scaled = value / step;
    return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * step;
  }

  function short(value) {
    if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (value >= 1e4) return (value / 1e3).toFixed(0) + "k";
    if (value >= 1e3) return (value / 1e3).toFixed(1) + "k";
    return String(Math.round(value * 10) / 10);
  }

  /* lines: [{name, points: [[t seconds, value], ...]}]; window: seconds shown, ending now (serverNow). */
  function draw(svg, lines, windowS, serverNow) {
    var width = Math.max(200, svg.clientWidth || 400), height = Math.max(100, svg.clientHeight || 140);
    var left = 40, right = 8, top = 8, bottom = 18;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var end = serverNow, start = end - windowS;
    var max = 0;
    lines.forEach(function (line) {
      line.points.forEach(function (p) { if (p[0] >= start && p[1] > max) max = p[1]; });
    });
    max = niceMax(max);
    function x(t) { return left + (t - start) / windowS * (width - left - right); }
    function y(v) { return top + (1 - v / max) * (height - top - bottom); }
    [0, 0.5, 1].forEach(function (f) {
      svg.appendChild(el("line", {x1: left, x2: width - right, y1: y(max * f), y2: y(max * f), "class": "grid"}));
      svg.appendChild(el("text", {x: left - 4, y: y(max * f) + 4, "text-anchor": "end", "class": "axis"}, short(max * f)));
    });
    svg.appendChild(el("text", {x: left, y: height - 4, "class": "axis"}, "-" + Math.round(windowS / 60) + " min"));
    svg.appendChild(el("text", {x: width - right, y: height - 4, "text-anchor": "end", "class": "axis"}, "now"));
    var drawn = 0;
    lines.forEach(function (line, i) {
      var shown = line.points.filter(function (p) { return p[0] >= start; });
      if (!shown.length) return;
      drawn++;
      var path = shown.map(function (p, j) { return (j ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1); });
      svg.appendChild(el("path", {d: path.join(" "), stroke: line.color || PALETTE[i % PALETTE.length], "class": "line"}));
    });
    if (!drawn) {
      svg.appendChild(el("text", {x: width / 2, y: height / 2, "text-anchor": "middle", "class": "nodata"}, "no data yet"));
    }
  }

  window.fdCharts = {draw: draw, palette: PALETTE};
})();
