/* FedEm public ledger: sorting, lease countdowns and the paged ledger. No framework, no network:
   the ledger's rows come from data files added as <script> tags (browsers refuse fetch() on file://). */
(function () {
  "use strict";

  // -- formats (the same as fedem_flwr/site/render.py) ---------------------------------------------
  function loss(x) { return x === null || x === undefined ? "-" : x.toFixed(3); }
  function losses(heldout) {
    var langs = Object.keys(heldout || {}).sort();
    return langs.length ? langs.map(function (l) { return l + " " + loss(heldout[l]); }).join(", ") : "-";
  }
  function tokens(x) { return x === null || x === undefined ? "-" : Math.round(x).toLocaleString("en-US"); }
  function signed(x) { return x === null || x === undefined ? "-" : (x >= 0 ? "+" : "") + x.toFixed(3); }
  function weight(x) { return x === null || x === undefined ? "-" : x.toFixed(2); }
  function dash(x) { return x === null || x === undefined ? "-" : String(x); }
  function judged(j) {
    var parts = [], hub = j.hub, p = j.peers;
    if (hub) {
      var verdict = hub.accepted === null || hub.accepted === undefined ? "" : hub.accepted ? " (accept)" : " (reject)";
      parts.push("hub " + signed(hub.delta) + " on " + tokens(hub.tokens) + " tokens" + verdict);
    }
    var effect = [p.role, p.effect].filter(function (word) { return word; }).join(": ");
    parts.push("peers " + dash(p.counted) + "/" + dash(p.asked) + " " + signed(p.delta) + " on " + tokens(p.tokens) +
               " tokens" + (effect ? " (" + effect + ")" : ""));
    return parts.join("; ");
  }
  function peerReport(r) {
    return dash(r.peer) + " " + signed(r.delta) + " on " + tokens(r.tokens) + " tokens, weight " + weight(r.weight) +
           ", " + dash(r.outcome);
  }
  // The same <details> as the judges macro (templates/macros.html), built from text only.
  function judgesElement(j) {
    var details = document.createElement("details"), summary = document.createElement("summary");
    var list = document.createElement("ul");
    details.className = "judges";
    summary.textContent = judged(j);
    details.appendChild(summary);
    (j.peers.reports || []).forEach(function (r) {
      var item = document.createElement("li");
      item.textContent = peerReport(r);
      list.appendChild(item);
    });
    details.appendChild(list);
    return details;
  }
  function when(iso) { return iso ? iso.replace("T", " ").replace("+00:00", "") : "-"; }
  function left(seconds) {
    var s = Math.floor(seconds);
    if (s <= 0) { return "due"; }
    var pad = function (n) { return (n < 10 ? "0" : "") + n; };
    return s >= 3600 ? Math.floor(s / 3600) + "h" + pad(Math.floor(s % 3600 / 60)) + "m"
                     : Math.floor(s / 60) + "m" + pad(s % 60) + "s";
  }
  function compare(a, b) {
    if (a === b) { return 0; }
    if (a === null || a === undefined || a === "-") { return -1; }
    if (b === null || b === undefined || b === "-") { return 1; }
    return a < b ? -1 : 1;
  }

  // -- sortable static tables ----------------------------------------------------------------------
  function cellValue(row, index, numeric) {
    var text = row.cells[index].textContent.trim();
    if (!numeric) { return text; }
    var n = parseFloat(text.replace(/[,%v]/g, ""));
    return isNaN(n) ? null : n;
  }
  function makeSortable(table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, index) {
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = th.textContent;
      th.textContent = "";
      th.appendChild(button);
      button.addEventListener("click", function () {
        var up = th.getAttribute("aria-sort") !== "ascending";
        var numeric = th.getAttribute("data-type") === "number";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", up ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var c = compare(cellValue(a, index, numeric), cellValue(b, index, numeric));
          return up ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function countdowns() {
    Array.prototype.forEach.call(document.querySelectorAll("time[data-deadline]"), function (el) {
      el.textContent = left((Date.parse(el.getAttribute("data-deadline")) - Date.now()) / 1000);
    });
  }

  // -- the ledger ----------------------------------------------------------------------------------
  function Ledger(meta) {
    this.meta = meta;
    this.col = {};
    for (var i = 0; i < meta.columns.length; i++) { this.col[meta.columns[i]] = i; }
    this.chunks = window.FEDEM_LEDGER = window.FEDEM_LEDGER || {};
    this.state = { adapter: "", decision: "", contributor: "", sort: "id", dir: "asc", page: 1 };
  }
  Ledger.prototype.load = function (index) {
    var chunks = this.chunks, file = this.meta.files[index];
    if (chunks[index]) { return Promise.resolve(chunks[index]); }
    return new Promise(function (resolve, reject) {
      var tag = document.createElement("script");
      tag.src = file;
      tag.onload = function () { resolve(chunks[index] || []); };
      tag.onerror = function () { reject(new Error("could not load " + file)); };
      document.head.appendChild(tag);
    });
  };
  Ledger.prototype.loadAll = function () {
    var self = this;
    return Promise.all(this.meta.files.map(function (_, i) { return self.load(i); })).then(function (parts) {
      return [].concat.apply([], parts);
    });
  };
  Ledger.prototype.filtered = function () {
    var s = this.state;
    return !!(s.adapter || s.decision || s.contributor) || s.sort !== "id";
  };
  // The rows of the current page: only the data files it needs when the ledger is in id order.
  Ledger.prototype.rows = function () {
    var self = this, s = this.state, size = this.meta.page_rows, total = this.meta.total;
    if (!this.filtered()) {
      var first = (s.page - 1) * size, last = Math.min(total, first + size);
      var lo = s.dir === "asc" ? first : total - last, hi = s.dir === "asc" ? last : total - first;
      var need = [];
      for (var c = Math.floor(lo / this.meta.chunk_rows); c * this.meta.chunk_rows < hi; c++) { need.push(c); }
      return Promise.all(need.map(function (c) { return self.load(c); })).then(function (parts) {
        var all = [].concat.apply([], parts), offset = need.length ? need[0] * self.meta.chunk_rows : 0;
        var page = all.slice(lo - offset, hi - offset);
        if (s.dir === "desc") { page.reverse(); }
        return { rows: page, matching: total };
      });
    }
    return this.loadAll().then(function (all) {
      var col = self.col, key = col[s.sort], up = s.dir === "asc";
      var rows = all.filter(function (r) {
        return (!s.adapter || r[col.adapter] === s.adapter) && (!s.decision || r[col.decision] === s.decision) &&
               (!s.contributor || r[col.contributor] === s.contributor);
      });
      rows.sort(function (a, b) {
        var c = compare(a[key], b[key]) || compare(a[col.id], b[col.id]);
        return up ? c : -c;
      });
      return { rows: rows.slice((s.page - 1) * size, s.page * size), matching: rows.length };
    });
  };
  Ledger.prototype.cell = function (row, name) {
    var v = row[this.col[name]];
    if (name === "received") { return when(v); }
    if (name === "tokens") { return tokens(v); }
    if (name === "heldout") { return losses(v); }
    if (name === "version" || name === "trained_on" || name === "judged_on") { return v === null ? "-" : "v" + v; }
    return v === null || v === undefined ? "-" : String(v);
  };
  Ledger.prototype.draw = function (result) {
    var self = this, s = this.state, size = this.meta.page_rows;
    var body = document.querySelector("#ledger tbody");
    var fresh = document.createElement("tbody");
    result.rows.forEach(function (row) {
      var tr = document.createElement("tr");
      self.meta.columns.forEach(function (name) {
        if (name === "judges") { return; }  // shown within the held-out loss cell
        var td = document.createElement("td");
        if (name === "contributor") {
          var a = document.createElement("a");
          a.href = "contributors/" + row[self.col.contributor].replace(/[^A-Za-z0-9_.-]/g, "_") + ".html";
          a.textContent = row[self.col.contributor];
          td.appendChild(a);
        } else {
          td.textContent = self.cell(row, name);
          if (name === "decision") { td.className = row[self.col.decision]; }
          if (name === "heldout" && row[self.col.judges]) { td.appendChild(judgesElement(row[self.col.judges])); }
        }
        tr.appendChild(td);
      });
      fresh.appendChild(tr);
    });
    body.parentNode.replaceChild(fresh, body);
    var pages = Math.max(1, Math.ceil(result.matching / size));
    var from = result.matching ? (s.page - 1) * size + 1 : 0;
    var to = Math.min(result.matching, s.page * size);
    document.getElementById("ledger-status").textContent = result.matching === this.meta.total
      ? "Showing " + from + "–" + to + " of " + this.meta.total + " contributions."
      : "Showing " + from + "–" + to + " of " + result.matching + " matching contributions (of " +
        this.meta.total + ").";
    document.getElementById("page-label").textContent = "Page " + s.page + " of " + pages;
    document.getElementById("prev").disabled = s.page <= 1;
    document.getElementById("next").disabled = s.page >= pages;
    Array.prototype.forEach.call(document.querySelectorAll("#ledger th[data-key]"), function (th) {
      if (th.getAttribute("data-key") === s.sort) {
        th.setAttribute("aria-sort", s.dir === "asc" ? "ascending" : "descending");
      } else {
        th.removeAttribute("aria-sort");
      }
    });
    document.body.setAttribute("data-ledger-ready", "true");
  };
  Ledger.prototype.show = function () {
    var self = this;
    document.body.removeAttribute("data-ledger-ready");
    return this.rows().then(function (r) { self.draw(r); }, function (err) {
      document.getElementById("ledger-status").textContent = "The ledger could not be loaded: " + err.message;
    });
  };
  Ledger.prototype.readHash = function () {
    var s = this.state, params = new URLSearchParams(location.hash.replace(/^#/, ""));
    ["adapter", "decision", "contributor"].forEach(function (k) { s[k] = params.get(k) || ""; });
    s.sort = this.col[params.get("sort")] !== undefined ? params.get("sort") : "id";
    s.dir = params.get("dir") === "desc" ? "desc" : "asc";
    s.page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
    var form = document.getElementById("ledger-filters");
    form.adapter.value = s.adapter;
    form.decision.value = s.decision;
    form.contributor.value = s.contributor;
  };
  Ledger.prototype.writeHash = function () {
    var s = this.state, params = new URLSearchParams();
    ["adapter", "decision", "contributor"].forEach(function (k) { if (s[k]) { params.set(k, s[k]); } });
    if (s.sort !== "id") { params.set("sort", s.sort); }
    if (s.dir !== "asc") { params.set("dir", s.dir); }
    if (s.page !== 1) { params.set("page", String(s.page)); }
    var hash = params.toString();
    if (location.hash.replace(/^#/, "") === hash) { this.show(); } else { location.hash = hash; }
  };
  Ledger.prototype.start = function () {
    var self = this, form = document.getElementById("ledger-filters");
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      self.state.adapter = form.adapter.value;
      self.state.decision = form.decision.value;
      self.state.contributor = form.contributor.value.trim();
      self.state.page = 1;
      self.writeHash();
    });
    form.addEventListener("reset", function () {
      self.state = { adapter: "", decision: "", contributor: "", sort: "id", dir: "asc", page: 1 };
      setTimeout(function () { self.writeHash(); }, 0);
    });
    form.adapter.addEventListener("change", function () { form.requestSubmit(); });
    form.decision.addEventListener("change", function () { form.requestSubmit(); });
    Array.prototype.forEach.call(document.querySelectorAll("#ledger th button[data-sort]"), function (b) {
      b.addEventListener("click", function () {
        var key = b.getAttribute("data-sort");
        self.state.dir = self.state.sort === key && self.state.dir === "asc" ? "desc" : "asc";
        self.state.sort = key;
        self.state.page = 1;
        self.writeHash();
      });
    });
    document.getElementById("prev").addEventListener("click", function () { self.state.page -= 1; self.writeHash(); });
    document.getElementById("next").addEventListener("click", function () { self.state.page += 1; self.writeHash(); });
    window.addEventListener("hashchange", function () { self.readHash(); self.show(); });
    this.readHash();
    this.show();
  };

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), makeSortable);
  countdowns();
  if (window.FEDEM_LEDGER_META && document.getElementById("ledger")) {
    new Ledger(window.FEDEM_LEDGER_META).start();
  }
}());
