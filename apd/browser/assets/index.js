(function () {
  "use strict";
  // rows: [family index, unit, density, n_active, max act, top-token frac, top-bigram frac, entropy, [[token, share], ...]]
  var data = JSON.parse(document.getElementById("index-data").textContent);
  var COLS = { family: 0, unit: 1, density: 2, active: 3, max: 4, token: 5, bigram: 6, entropy: 7 };
  var ASCENDING_FIRST = { family: true, unit: true, entropy: true };
  var state = { sort: "", dir: "asc", fam: "", q: "", size: 200, page: 0 };
  var tbody = document.getElementById("units-body");
  var famSel = document.getElementById("fam");
  var search = document.getElementById("q");
  var sizeSel = document.getElementById("size");
  var counter = document.getElementById("count");
  var prevBtn = document.getElementById("prev");
  var nextBtn = document.getElementById("next");
  var heads = document.querySelectorAll("#units th[data-key]");

  function fmtG(x, p) {
    // like Python's "%.{p}g"
    if (x === null) return "\u2013";
    if (x === 0) return "0";
    var e = Math.floor(Math.log10(Math.abs(x)));
    var s;
    if (e < -4 || e >= p) {
      s = x.toExponential(p - 1).replace(/\.?0+e/, "e");
      s = s.replace(/e([+-])(\d)$/, "e$10$2");
    } else {
      s = x.toPrecision(p);
      if (s.indexOf(".") >= 0) s = s.replace(/\.?0+$/, "");
    }
    return s;
  }

  function readHash() {
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf("=");
      var k = decodeURIComponent(i < 0 ? kv : kv.slice(0, i));
      var v = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1));
      if (k === "sort" && Object.prototype.hasOwnProperty.call(COLS, v)) state.sort = v;
      else if (k === "dir") state.dir = v === "desc" ? "desc" : "asc";
      else if (k === "fam") state.fam = v;
      else if (k === "q") state.q = v;
      else if (k === "size") state.size = v === "all" ? 0 : Math.max(1, parseInt(v, 10) || 200);
      else if (k === "page") state.page = Math.max(0, parseInt(v, 10) || 0);
    });
  }

  function writeHash() {
    var parts = [];
    if (state.sort) parts.push("sort=" + state.sort, "dir=" + state.dir);
    if (state.fam) parts.push("fam=" + encodeURIComponent(state.fam));
    if (state.q) parts.push("q=" + encodeURIComponent(state.q));
    if (state.size !== 200) parts.push("size=" + (state.size || "all"));
    if (state.page) parts.push("page=" + state.page);
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
  }

  function compare(a, b) {
    var i = COLS[state.sort];
    var x = a[i], y = b[i];
    var natural = a[0] - b[0] || a[1] - b[1];
    if (x === null || y === null) return x === y ? natural : x === null ? 1 : -1; // missing values last
    var d = x < y ? -1 : x > y ? 1 : 0;
    return (state.dir === "desc" ? -d : d) || natural;
  }

  function matches(r) {
    if (state.fam && data.fams[r[0]].name !== state.fam) return false;
    if (!state.q) return true;
    var q = state.q.toLowerCase();
    if ((data.fams[r[0]].name + "/" + r[1]).toLowerCase().indexOf(q) >= 0) return true;
    return r[8].some(function (t) { return t[0].toLowerCase().indexOf(q) >= 0; });
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function rowEl(r) {
    var fam = data.fams[r[0]];
    var tr = document.createElement("tr");
    cell(tr, fam.name).title = fam.kind;
    var td = cell(tr, "", "num");
    var a = document.createElement("a");
    a.href = "units/" + fam.name + "_" + r[1] + ".html";
    a.textContent = String(r[1]);
    td.appendChild(a);
    cell(tr, fmtG(r[2], 3), "num");
    cell(tr, String(r[3]), "num");
    cell(tr, fmtG(r[4], 3), "num");
    cell(tr, fmtG(r[5], 2), "num");
    cell(tr, fmtG(r[6], 2), "num");
    cell(tr, fmtG(r[7], 3), "num");
    var chips = cell(tr, "", "chips");
    r[8].forEach(function (t) {
      var s = document.createElement("span");
      s.className = "tok";
      s.textContent = t[0];
      var p = document.createElement("span");
      p.className = "pct";
      p.textContent = Math.round(t[1] * 100) + "%";
      chips.appendChild(s);
      chips.appendChild(p);
    });
    return tr;
  }

  function render() {
    var list = data.rows.filter(matches);
    if (state.sort) list.sort(compare);
    var size = state.size || Math.max(1, list.length);
    var pages = Math.max(1, Math.ceil(list.length / size));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * size;
    var frag = document.createDocumentFragment();
    list.slice(start, start + size).forEach(function (r) { frag.appendChild(rowEl(r)); });
    tbody.replaceChildren(frag);
    counter.textContent = list.length
      ? "units " + (start + 1) + "\u2013" + Math.min(start + size, list.length) + " of " + list.length
        + (list.length < data.rows.length ? " (" + data.rows.length + " in all)" : "")
      : "no units match";
    prevBtn.disabled = state.page === 0;
    nextBtn.disabled = state.page >= pages - 1;
    heads.forEach(function (th) {
      var key = th.getAttribute("data-key");
      th.setAttribute("aria-sort", key === state.sort ? (state.dir === "asc" ? "ascending" : "descending") : "none");
    });
    writeHash();
  }

  heads.forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      if (state.sort === key) state.dir = state.dir === "asc" ? "desc" : "asc";
      else { state.sort = key; state.dir = ASCENDING_FIRST[key] ? "asc" : "desc"; }
      state.page = 0;
      render();
    });
  });
  famSel.addEventListener("change", function () { state.fam = famSel.value; state.page = 0; render(); });
  search.addEventListener("input", function () { state.q = search.value; state.page = 0; render(); });
  sizeSel.addEventListener("change", function () { state.size = parseInt(sizeSel.value, 10); state.page = 0; render(); });
  prevBtn.addEventListener("click", function () { state.page -= 1; render(); });
  nextBtn.addEventListener("click", function () { state.page += 1; render(); });

  readHash();
  famSel.value = state.fam;
  if (famSel.value !== state.fam) state.fam = "";
  search.value = state.q;
  sizeSel.value = String(state.size);
  if (sizeSel.value !== String(state.size)) {
    var opt = document.createElement("option");
    opt.value = String(state.size);
    opt.textContent = state.size ? String(state.size) : "all";
    sizeSel.appendChild(opt);
    sizeSel.value = String(state.size);
  }
  render();
})();
